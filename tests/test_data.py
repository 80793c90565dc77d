"""The data stage end to end: conversations written to files, built through data.run / the CLI,
compared id for id with mistral-common and with the exported tokenizer; mixtures, Hub sources,
cleaning, the report; and malformed files that must give a clean reject or error."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
from functools import lru_cache

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import load_from_disk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_tune import cli
from mistral_tune.stages import data
from mistral_tune.datasets import sources
from mistral_tune.config import compose
from mistral_tune.errors import UserError
from mistral_tune.formats.templates import TEMPLATES, TEXT_TEMPLATES, mistral_tokenizer_file
from mistral_tune.formats.tokenizer import load_tokenizer
from tests.helpers import data_reports

N = 300
CONTROL = ("<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CALLS]")
PIECES = ["hello", "world", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "é", "日本語", "Ω", "ﬁ", "🙂",
          "👨‍👩‍👧", "123", ".", "!?", "▁", "{{ x }}", "'", '"', "\\", "[", "]", "<", ">", "/", "INST"]
ROLE = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def text(rng: random.Random) -> str:
    while True:  # the data stage rejects blank content, as it should
        pieces = [rng.choice(PIECES) for _ in range(rng.randint(1, 10))]
        if rng.random() < 0.1:  # control strings in content must stay text
            pieces.insert(rng.randint(0, len(pieces)), rng.choice(CONTROL))
        out = "".join(pieces)
        if out.strip():
            return out


def conversation(rng: random.Random, end: str = "assistant") -> list[dict]:
    messages = [{"role": "system", "content": text(rng)}] if rng.random() < 0.5 else []
    turns = rng.randint(1, 4)
    for turn in range(turns):
        messages.append({"role": "user", "content": text(rng)})
        if turn < turns - 1 or end == "assistant":
            messages.append({"role": "assistant", "content": text(rng)})
    return messages


def has_control(messages: list[dict]) -> bool:
    return any(c in m["content"] for m in messages for c in CONTROL)


@lru_cache(maxsize=None)
def reference(template: str, mode: ValidationMode) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(mistral_tokenizer_file(template)), mode=mode)


def mistral_common_ids(messages: list[dict], template: str, mode=ValidationMode.finetuning) -> list[int]:
    request = ChatCompletionRequest(messages=[ROLE[m["role"]](content=m["content"]) for m in messages])
    return reference(template, mode).encode_chat_completion(request).tokens


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def build(tmp_path, *overrides):
    # eval.split_fraction=0: these tests account for every given row; the held-out split of user
    # data is tested in tests/test_real_model.py
    cfg = compose([f"run_dir={tmp_path / 'run'}", "logger=none", "eval.split_fraction=0", *overrides])
    out = data.run(cfg)
    return out, data_reports(out.parent)


# --- templates through the data stage --------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES)
def test_built_data_matches_mistral_common_and_the_exported_template(tmp_path, template):
    rng = random.Random(template)
    chats = [conversation(rng) for _ in range(N)]
    prompts = [conversation(rng, end="user") for _ in range(N // 2)]
    pairs = [{"prompt": p, "chosen": [{"role": "assistant", "content": text(rng)}],
              "rejected": [{"role": "assistant", "content": text(rng)}]} for p in prompts]
    pairs = [p for p in pairs if p["chosen"][0]["content"].strip() != p["rejected"][0]["content"].strip()]
    sft = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in chats])
    dpo = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out, report = build(tmp_path, f"template={template}", f"sft.data.files=[{sft}]", f"dpo.data.files=[{dpo}]",
                        "sft.data.max_length=100000", "dpo.data.max_length=100000")
    assert report["sft"]["kept"] == len(chats) and report["dpo"]["kept"] == len(pairs)
    tok = load_tokenizer(out.parent / "tokenizer")
    built = load_from_disk(str(out / "sft" / "dataset"))
    exact_jinja = 0
    for messages, row in zip(chats, built, strict=True):
        assert row["input_ids"] == mistral_common_ids(messages, template), messages
        if not has_control(messages):  # where the README says the exported template agrees
            hf = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
            assert hf["input_ids"] == row["input_ids"] and hf["assistant_masks"] == row["assistant_masks"]
            exact_jinja += 1
    assert N // 4 < exact_jinja < N  # both kinds of content were built
    for pair, row in zip(pairs, load_from_disk(str(out / "dpo" / "dataset")), strict=True):
        assert row["prompt_ids"] == mistral_common_ids(pair["prompt"], template, ValidationMode.test)
        for name in ("chosen", "rejected"):
            full = mistral_common_ids(pair["prompt"] + pair[name], template)
            assert row["prompt_ids"] + row[f"{name}_ids"] == full
        if not has_control(pair["prompt"]):
            hf = tok.apply_chat_template(pair["prompt"], add_generation_prompt=True, return_dict=True)
            assert hf["input_ids"] == row["prompt_ids"]


@pytest.mark.parametrize("template", TEXT_TEMPLATES)
@pytest.mark.parametrize("model", ["tiny", "mistral_7b_v0_3"])
def test_chatml_and_zephyr_built_data_match_the_exported_template(tmp_path, template, model):
    rng = random.Random(7)
    chats = [m for m in (conversation(rng) for _ in range(150)) if not has_control(m)]
    sft = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in chats])
    out, report = build(tmp_path, f"model={model}", f"template={template}", f"sft.data.files=[{sft}]",
                        "dpo.data.files=[]", "sft.data.max_length=100000")
    assert report["vocab"] == ("mistral_v1" if model == "tiny" else "mistral_v3")
    tok = load_tokenizer(out.parent / "tokenizer")
    assert len(tok) == (32000 if model == "tiny" else 32768)
    for messages, row in zip(chats, load_from_disk(str(out / "sft" / "dataset")), strict=True):
        hf = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert hf["input_ids"] == row["input_ids"] and hf["assistant_masks"] == row["assistant_masks"]
        assert row["input_ids"][-1] == tok.eos_token_id and row["assistant_masks"][-1] == 1


# --- mixtures, Hub sources, cleaning, report ---------------------------------------------------


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question number {i} about topic {i * 7}?"},
                         {"role": "assistant", "content": f"Answer {i}."}]}


def test_mixture_weights_are_deterministic_and_counted(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(100 + i) for i in range(10)])
    mixture = f"sft.data.sources=[{{path: {a}, weight: 0.25}}, {{path: {b}, weight: 2.5}}]"
    out, report = build(tmp_path, "sft.data.files=[]", mixture, "dpo.data.files=[]")
    sft = report["sft"]
    assert sft["per_source"][str(a)] | {} == {"read": 40, "kept": 40, "rejected": 0, "deduplicated": 0,
                                              "decontaminated": 0, "too_long": 0, "weight": 0.25, "examples": 10}
    assert sft["per_source"][str(b)]["examples"] == 25 and sft["examples"] == len(load_from_disk(str(out / "sft" / "dataset"))) == 35
    first = [r["input_ids"] for r in load_from_disk(str(out / "sft" / "dataset"))]
    # the same seed gives the same mixture; another seed another subset
    _, _ = build(tmp_path / "again", "sft.data.files=[]", mixture, "dpo.data.files=[]")
    assert [r["input_ids"] for r in load_from_disk(str(tmp_path / "again" / "run" / "data" / "sft" / "dataset"))] == first
    build(tmp_path / "seed", "sft.data.files=[]", mixture, "dpo.data.files=[]", "seed=1")
    assert [r["input_ids"] for r in load_from_disk(str(tmp_path / "seed" / "run" / "data" / "sft" / "dataset"))] != first


def test_files_and_sources_together_is_an_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(1)])
    with pytest.raises(UserError, match="both set"):
        build(tmp_path, f"sft.data.sources=[{{path: {a}}}]")  # the bundled files are still there


def test_hub_source_with_split_subset_revision_format_and_renames(tmp_path, monkeypatch):
    import datasets

    calls = []
    rows = [{"dialog": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]}
            for i in range(6)]

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources, "_HUB_DATASETS", {})
    hub = ("sft.data.sources=[{path: org/chats, split: train_sft, name: en, revision: v1.0, format: sharegpt, "
           "columns: {dialog: conversations}, weight: 0.5}]")
    out, report = build(tmp_path, "sft.data.files=[]", hub, "dpo.data.files=[]")
    assert calls == [("org/chats", "en", "train_sft", "v1.0")]  # loaded once: cache key and build share it
    counts = report["sft"]["per_source"]["hub:org/chats[en]:train_sft@v1.0"]
    assert (counts["read"], counts["kept"], counts["examples"]) == (6, 6, 3)

    monkeypatch.setattr(sources, "_HUB_DATASETS", {})
    bad = "sft.data.sources=[{path: org/chats, columns: {dialogue: conversations}}]"
    with pytest.raises(UserError, match="columns to rename not found: dialogue"):
        build(tmp_path / "bad", "sft.data.files=[]", bad, "dpo.data.files=[]")


def test_hub_source_that_cannot_load_is_a_user_error(tmp_path, monkeypatch):
    import datasets

    def missing(path, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    monkeypatch.setattr(sources, "_HUB_DATASETS", {})
    with pytest.raises(UserError, match="cannot load Hub dataset hub:nobody/nothing:train: Dataset 'nobody/nothing'"):
        build(tmp_path, "sft.data.files=[]", "sft.data.sources=[{path: nobody/nothing}]", "dpo.data.files=[]")
    a = write_jsonl(tmp_path / "a.jsonl", [chat(1)])
    with pytest.raises(UserError, match="Hub datasets only"):
        build(tmp_path, "sft.data.files=[]", f"sft.data.sources=[{{path: {a}, split: train}}]", "dpo.data.files=[]")
    with pytest.raises(UserError, match="data file not found"):
        build(tmp_path, "sft.data.files=[]", "sft.data.sources=[{path: missing/chats.jsonl}]", "dpo.data.files=[]")


def test_dedup_and_decontamination_are_counted_per_source_and_rejected_with_reasons(tmp_path):
    rows_a = [chat(i) for i in range(20)]
    near = {"messages": [{"role": "user", "content": "Question number 3 about topic 21?"},
                         {"role": "assistant", "content": "Answer 3!!"}]}  # punctuation only: exact dup
    longer = {"messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(40))},
                           {"role": "assistant", "content": "ok"}]}
    longer_near = {"messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(40)) + " w99"},
                                {"role": "assistant", "content": "ok"}]}
    a = write_jsonl(tmp_path / "a.jsonl", rows_a + [longer])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(5), near, longer_near, chat(50)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "question number 7 about topic 49"},
                                                  {"turns": ["Question number 50 about topic 350"]}])
    srcs = f"sft.data.sources=[{{path: {a}}}, {{path: {b}}}]"
    common = ["sft.data.files=[]", srcs, "dpo.data.files=[]", f"data.decontaminate.files=[{evals}]"]
    out, report = build(tmp_path, *common, "data.dedup=near")
    per = report["sft"]["per_source"]
    assert (per[str(a)]["decontaminated"], per[str(a)]["deduplicated"], per[str(a)]["kept"]) == (1, 0, 20)
    assert (per[str(b)]["decontaminated"], per[str(b)]["deduplicated"], per[str(b)]["kept"]) == (1, 3, 0)
    for counts in [report["sft"], *per.values()]:
        assert counts["read"] == sum(counts[k] for k in ("kept", "rejected", "deduplicated", "decontaminated", "too_long"))
    rejects = [json.loads(line) for line in (out / "sft" / "rejects.jsonl").read_text().splitlines()]
    reasons = {(r["file"], r["row"]): r["reason"] for r in rejects}
    assert reasons[(str(b), 1)] == f"duplicate of {a}, line 6"
    assert reasons[(str(b), 3)] == f"near duplicate (Jaccard 0.88) of {a}, line 21"  # 37 of 42 5-grams shared
    assert "evaluation prompt at" in reasons[(str(a), 8)]
    # exact only: the near duplicate stays; none: everything stays but the contaminated rows
    _, report = build(tmp_path / "exact", *common, "data.dedup=exact")
    assert report["sft"]["deduplicated"] == 2
    _, report = build(tmp_path / "none", *common)
    assert report["sft"]["deduplicated"] == 0 and report["sft"]["decontaminated"] == 2


def test_evaluation_file_without_prompts_is_a_user_error(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"answer": "42"}])
    with pytest.raises(UserError, match="no prompt found"):
        build(tmp_path, f"data.decontaminate.files=[{evals}]", "sft.data.limit=4", "dpo.data.limit=4")


def test_changed_cleaning_settings_never_reuse_the_build(tmp_path):
    build(tmp_path, "sft.data.limit=8", "dpo.data.limit=8")
    with pytest.raises(UserError, match="different config"):
        build(tmp_path, "sft.data.limit=8", "dpo.data.limit=8", "data.dedup=exact")


def test_report_statistics_and_histogram(tmp_path):
    out, report = build(tmp_path, "sft.data.limit=50", "dpo.data.limit=30")
    sft, dpo = report["sft"], report["dpo"]
    assert set(sft["length"]) == {"min", "mean", "median", "p95", "max"}
    assert 0 < sft["trained_fraction"] < 1 and sft["trained_tokens"] < sft["tokens"]
    assert 0 < dpo["trained_fraction"] < 1 and dpo["prompt_length"]["max"] > 0
    png = (out / "sft" / sft["histogram"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


# --- malformed files ---------------------------------------------------------------------------


def _serialize(rows: list, fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "json":
        return json.dumps(rows).encode()
    if fmt == "csv":
        columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in (r.get(c, "") for c in columns)])
        return buf.getvalue().encode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


_JUNK = [b'"', b"{", b"}", b"[", b"]", b",", b"\n", b"\x00", b"\xff\xfe", b"null", b"\\ud800", b"\r", b'""']
_VALUES = [None, 1, True, "", " ", [], {}, "x", [1], [{}], {"role": "user"}, [{"role": "user", "content": None}],
           [{"role": "gpt", "value": "x"}], [{"role": "assistant", "content": "a"}], "\ud800"]


def _corrupt_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(b)) if b else 0
        op = rng.choice(["flip", "delete", "insert", "truncate"])
        if op == "flip" and b:
            b[i] = rng.randrange(256)
        elif op == "delete":
            del b[i:i + rng.randint(1, 20)]
        elif op == "insert":
            b[i:i] = rng.choice(_JUNK)
        else:
            del b[i:]
    return bytes(b)


def _corrupt_row(rng: random.Random, row):
    row = json.loads(json.dumps(row))
    node = row
    while True:  # walk down to a random container and break one thing in it
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return row
        key = rng.choice(keys)
        if rng.random() < 0.4 or not isinstance(node[key], (dict, list)) or not node[key]:
            action = rng.choice(["value", "drop", "rename"])
            if action == "value":
                node[key] = rng.choice(_VALUES)
            elif action == "drop":
                node.pop(key)
            elif isinstance(node, dict):
                node[f"{key}_x"] = node.pop(key)
            return row
        node = node[key]


def _malformed_files(tmp_path, seed: int, count: int):
    rng = random.Random(seed)
    sft = [json.loads(line) for line in open(data.__file__.replace("mistral_tune/stages/data.py", "data/sft.jsonl"))][:12]
    dpo = [json.loads(line) for line in open(data.__file__.replace("mistral_tune/stages/data.py", "data/dpo.jsonl"))][:12]
    made = 0
    while made < count:
        kind, fmt = rng.choice(["sft", "dpo"]), rng.choice(["jsonl", "json", "csv", "parquet"])
        rows = [_corrupt_row(rng, r) if rng.random() < 0.3 else r for r in (sft if kind == "sft" else dpo)]
        try:
            blob = _serialize(rows, fmt)
        except (pa.ArrowException, UnicodeEncodeError):  # pyarrow cannot hold this mix of types
            continue
        if rng.random() < 0.5:
            blob = _corrupt_bytes(rng, blob)
        path = tmp_path / f"case{made}_{kind}.{fmt}"
        path.write_bytes(blob)
        made += 1
        yield kind, path


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_malformed_files_give_a_clean_reject_or_error(tmp_path, capsys, on_error):
    """In process through the CLI's main (exit status and stderr as the user sees them)."""
    outcomes = {0: 0, 2: 0}
    for case, (kind, path) in enumerate(_malformed_files(tmp_path, seed=len(on_error), count=15)):
        other = "dpo" if kind == "sft" else "sft"
        run = tmp_path / f"run{case}"
        status = cli.main(["data", f"run_dir={run}", f"{kind}.data.files=[{path}]", f"{other}.data.files=[]",
                           f"data.on_error={on_error}", "logger=none"])
        err = capsys.readouterr().err
        assert status in (0, 2) and "Traceback" not in err, err
        outcomes[status] += 1
        if status == 2:
            message = err.split("error: ", 1)[1]
            assert str(path) in message or "no usable rows" in message, message
            continue
        report = data_reports(run)[kind]
        assert report["read"] == report["kept"] + report["rejected"] + report["too_long"]
        for line in (run / "data" / kind / "rejects.jsonl").read_text().splitlines():
            reject = json.loads(line)
            assert reject["file"] == str(path) and reject["row"] >= 1 and reject["field"] and reject["reason"]
    assert outcomes[2] > 0 and (on_error == "raise" or outcomes[0] > 0)


def test_malformed_files_through_the_cli_subprocess(tmp_path):
    for case, (kind, path) in enumerate(_malformed_files(tmp_path, seed=3, count=2)):
        other = "dpo" if kind == "sft" else "sft"
        proc = subprocess.run([sys.executable, "-m", "mistral_tune", "data", f"run_dir={tmp_path / str(case)}",
                               f"{kind}.data.files=[{path}]", f"{other}.data.files=[]"], capture_output=True, text=True)
        assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr
        if proc.returncode == 2:
            assert str(path) in proc.stderr or "no usable rows" in proc.stderr


def test_bundled_training_data_is_decontaminated_against_the_bundled_held_out_files(tmp_path):
    """The bundled chats and pairs are checked against the prompts of data/eval_sft.jsonl and
    data/eval_dpo.jsonl (eval's held-out files) and the report counts the matches: none, since
    data/make_data.py draws the held-out questions from another part of the question space. Other
    files, and the tool task, are checked only against data.decontaminate.files, as before."""
    cfg = compose([f"run_dir={tmp_path}", "logger=none"])
    held = sorted(str(data.DATA_DIR / name) for name in data.BUNDLED_EVAL.values())
    assert sorted(data._decontaminate_files(cfg, "sft")) == held and sorted(data._decontaminate_files(cfg, "dpo")) == held
    assert sorted(data._decontaminate_files(compose([f"run_dir={tmp_path}", "pairs=onpolicy"]), "dpo")) == held
    own = write_jsonl(tmp_path / "own.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]}])
    assert data._decontaminate_files(compose([f"run_dir={tmp_path}", f"sft.data.files=[{own}]"]), "sft") == []
    tools = str(data.DATA_DIR / "tools_sft.jsonl")
    assert data._decontaminate_files(compose([f"run_dir={tmp_path}", f"sft.data.files=[{tools}]"]), "sft") == []
    _, report = build(tmp_path / "b", "sft.data.limit=300", "dpo.data.limit=100")
    for kind in ("sft", "dpo"):
        assert sorted(report[kind]["decontaminate"]["files"]) == held and report[kind]["decontaminate"]["prompts"] > 500
        assert report[kind]["decontaminated"] == 0 and report[kind]["kept"] == report[kind]["read"]
