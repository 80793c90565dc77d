"""The data stage at scale: the streaming build gives the same dataset, report and rejects for any
data.num_proc; the sampled self-check encodes what the checked path does; near-duplicate search
keeps results and bounded memory; over-long rows (data.overlong, data.max_drop_fraction); Hub
sources streamed and still keyed on content."""

from __future__ import annotations

import json
import logging
import random
import tracemalloc
from types import SimpleNamespace

import pytest
from datasets import load_from_disk

from mistral_tune.datasets import build as build_engine
from mistral_tune.datasets import cleaning, sources
from mistral_tune.errors import UserError
from mistral_tune.formats import templates
from tests.test_data import build, conversation, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def prose(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat(rng: random.Random, turns: int, words: int) -> dict:
    messages = []
    for _ in range(turns):
        messages += [{"role": "user", "content": prose(rng, words)}, {"role": "assistant", "content": prose(rng, words)}]
    return {"messages": messages}


def test_num_proc_gives_the_same_dataset_report_and_rejects(tmp_path, monkeypatch):
    """Chunks finish out of order on 2 processes; what is written must not depend on it."""
    monkeypatch.setattr(build_engine, "CHUNK", 7)  # many chunks in flight, some partial
    rng = random.Random(0)
    rows = [chat(rng, rng.randint(1, 3), rng.randint(3, 40)) for _ in range(150)]
    rows[10] = rows[3]  # a duplicate
    rows[20] = {"messages": [{"role": "user", "content": "no reply"}]}  # invalid: rejected
    rows[30] = chat(rng, 3, 200)  # too long
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ["sft.data.files=[]", f"sft.data.sources=[{{path: {path}}}]", "dpo.data.files=[]",
              "sft.data.max_length=300", "data.on_error=skip", "data.dedup=exact", "data.max_drop_fraction=0.5"]
    outs = {}
    for n in (1, 2):
        out, report = build(tmp_path / f"p{n}", *common, f"data.num_proc={n}")
        dataset = load_from_disk(str(out / "sft" / "dataset"))
        outs[n] = (dataset.to_dict(), report["sft"], (out / "sft" / "rejects.jsonl").read_text())
    assert outs[1] == outs[2]
    dataset, report, rejects = outs[1]
    long = [i for i, r in enumerate(rows) if i not in (10, 20)
            and len(templates.encode_chat(r["messages"], "mistral_v1").input_ids) > 300]
    assert 30 in long and len(long) > 5
    assert (report["read"], report["rejected"], report["deduplicated"], report["too_long"]) == (150, 1, 1, len(long))
    assert len(dataset["input_ids"]) == report["kept"] == 148 - len(long)
    # row order kept: the n-th kept row is the n-th usable input row, encoded as the plain path does
    usable = [r for i, r in enumerate(rows) if i not in (10, 20, *long)]
    for i in range(0, len(usable), 10):
        assert dataset["input_ids"][i] == templates.encode_chat(usable[i]["messages"], "mistral_v1").input_ids
    assert [json.loads(line)["row"] for line in rejects.splitlines()] == sorted([11, 21, *(i + 1 for i in long)])


@pytest.mark.parametrize("template", templates.TEMPLATES)
def test_unverified_encoding_equals_the_checked_one(template):
    """The data stage skips mistral-common's second encoding on most rows: the ids and masks must be
    the ones the checked path gives (which the template tests compare with mistral-common)."""
    rng = random.Random(template)
    for _ in range(60):
        messages = conversation(rng)
        for train_on in templates.TRAIN_ON:
            assert (templates.encode_chat(messages, template, train_on=train_on, verify=False)
                    == templates.encode_chat(messages, template, train_on=train_on))
        prompt = conversation(rng, end="user")
        assert (templates.encode_preference(prompt, "yes", "no", template, verify=False)
                == templates.encode_preference(prompt, "yes", "no", template))


def _plain_near_dedup(texts: list[str], threshold: float) -> list[int | None]:
    """All pairs, exact Jaccard of word 5-gram sets: for each text, the earlier kept text it
    near-duplicates (or exactly duplicates), else None."""
    kept, out = [], []
    for text in texts:
        tokens = cleaning.words(text)
        shingles = cleaning._shingles(tokens)
        match = None
        for i, (other_tokens, other) in kept:
            if other_tokens == tokens or len(shingles & other) / len(shingles | other) >= threshold:
                match = i
                break
        out.append(match)
        if match is None:
            kept.append((len(out) - 1, (tokens, shingles)))
    return out


def test_near_dedup_finds_what_all_pairs_finds():
    rng = random.Random(1)
    texts = []
    for i in range(120):
        if i > 10 and rng.random() < 0.4:  # an edited copy of an earlier row: a few words changed
            words = texts[rng.randrange(i)].split()
            for _ in range(rng.randint(0, 6)):
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            texts.append(" ".join(words))
        else:
            texts.append(prose(rng, rng.randint(30, 60)))
    dedup = cleaning.Deduplicator("near", 0.8)
    found = [dedup.check(t, f"row {i}") for i, t in enumerate(texts)]
    plain = _plain_near_dedup(texts, 0.8)
    assert [f is not None for f in found] == [p is not None for p in plain]
    assert sum(p is not None for p in plain) > 10  # the test has near duplicates to find (and copies edited past 0.8)
    for reason, match in zip(found, plain):
        if match is not None:
            assert reason.endswith(f"of row {match}")


def test_near_dedup_memory_does_not_grow_with_row_length():
    """The old search kept every row's 5-gram set (~70 kB for a 900-word row); what it keeps now is
    a digest, a location and one entry per band, whatever the length."""
    rng = random.Random(2)
    texts = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(900)) for _ in range(300)]
    dedup = cleaning.Deduplicator("near", 0.8)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, text in enumerate(texts):
        assert dedup.check(text, f"row {i}") is None
    per_row = (tracemalloc.get_traced_memory()[0] - before) / len(texts)
    tracemalloc.stop()
    assert per_row < 3000, per_row
    assert dedup.check(texts[123], "again") == "duplicate of row 123"
    assert dedup.check(texts[45][:-8] + " w1", "edited").startswith("near duplicate (Jaccard 1.00) of row 45")


def test_overlong_truncate_cuts_at_the_last_whole_assistant_turn(tmp_path):
    rng = random.Random(3)
    rows = [chat(rng, 3, 40), chat(rng, 1, 400), chat(rng, 1, 5)]  # cut to 1 or 2 turns; too long; fits
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    max_length = len(templates.encode_chat(rows[0]["messages"][:4], "mistral_v1").input_ids)
    assert len(templates.encode_chat(rows[0]["messages"], "mistral_v1").input_ids) > max_length
    common = ["sft.data.files=[]", f"sft.data.sources=[{{path: {path}}}]", "dpo.data.files=[]",
              f"sft.data.max_length={max_length}", "data.max_drop_fraction=0.7"]
    out, report = build(tmp_path, *common, "data.overlong=truncate")
    sft = report["sft"]
    assert (sft["kept"], sft["truncated"], sft["too_long"]) == (2, 1, 1)
    dataset = load_from_disk(str(out / "sft" / "dataset"))
    expected = templates.encode_chat(rows[0]["messages"][:4], "mistral_v1")  # two whole turns, EOS kept
    assert dataset[0]["input_ids"] == expected.input_ids and dataset[0]["assistant_masks"] == expected.assistant_masks
    assert dataset[0]["input_ids"][-1] == 2 and dataset[0]["assistant_masks"][-1] == 1
    reject = json.loads((out / "sft" / "rejects.jsonl").read_text())
    assert reject["row"] == 2 and "> max_length" in reject["reason"]
    # drop: the over-long conversation goes too, counted
    _, report = build(tmp_path / "drop", *common)
    assert (report["sft"]["kept"], report["sft"]["too_long"]) == (1, 2) and "truncated" not in report["sft"]


def test_preference_pairs_are_dropped_not_truncated(tmp_path):
    pairs = [{"prompt": prose(random.Random(i), 10), "chosen": prose(random.Random(i + 1), 8 if i else 300),
              "rejected": "no"} for i in range(5)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    _, report = build(tmp_path, "sft.data.files=[]", "stages=[dpo]", f"dpo.data.files=[{path}]",
                      "dpo.data.max_length=100", "data.overlong=truncate", "data.max_drop_fraction=0.3")
    assert (report["dpo"]["kept"], report["dpo"]["too_long"]) == (4, 1)


def test_too_many_overlong_rows_stop_the_build(tmp_path, caplog):
    rng = random.Random(4)
    rows = [chat(rng, 1, 5) for _ in range(3)] + [chat(rng, 1, 300) for _ in range(27)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ["sft.data.files=[]", f"sft.data.sources=[{{path: {path}}}]", "dpo.data.files=[]", "sft.data.max_length=64"]
    with caplog.at_level(logging.WARNING, logger="mistral_tune"), \
            pytest.raises(UserError, match=r"sft: 27 of 30 rows are too long \(more than data.max_drop_fraction=0.1\)"):
        build(tmp_path, *common)
    assert "27 of 30 rows (90.0%) are longer than max_length 64" in caplog.text
    assert "sft.data.max_length" in caplog.text and "data.overlong=truncate" in caplog.text
    assert not (tmp_path / "run" / "data" / "sft" / "dataset").exists()  # nothing to train on by mistake
    _, report = build(tmp_path / "ok", *common, "data.max_drop_fraction=0.9")
    assert (report["sft"]["kept"], report["sft"]["too_long"]) == (3, 27)
    with pytest.raises(UserError, match="data.overlong='cut'"):
        build(tmp_path / "bad", *common, "data.overlong=cut")


def test_streamed_hub_source_is_read_and_keyed_on_content(tmp_path, monkeypatch):
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(9)]
    calls, builder = [], SimpleNamespace(config_id="default", hash="abc123")

    def fake_load_dataset(path, name=None, split=None, revision=None, streaming=False):
        calls.append((path, split, streaming))
        return datasets.Dataset.from_list(rows).to_iterable_dataset() if streaming else datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, name=None, revision=None: builder)
    monkeypatch.setattr(sources, "_HUB_DATASETS", {})
    hub = "sft.data.sources=[{path: org/chats, split: train_sft, streaming: true}]"
    out, report = build(tmp_path, "sft.data.files=[]", hub, "dpo.data.files=[]")
    assert calls == [("org/chats", "train_sft", True)]  # the cache key did not download it
    assert report["sft"]["per_source"]["hub:org/chats:train_sft"]["kept"] == 9
    assert len(load_from_disk(str(out / "sft" / "dataset"))) == 9

    src = sources.Source(path="org/chats", split="train_sft", streaming=True)
    first = sources.hub_fingerprint(src)
    builder.hash = "def456"  # a new commit of the dataset repository
    assert sources.hub_fingerprint(src) != first
    builder.hash = None
    with pytest.raises(UserError, match="no content hash"):
        sources.hub_fingerprint(src)
    with pytest.raises(UserError, match="streaming apply to Hub datasets only"):
        list(sources.iter_source(sources.Source(path=str(out / "sft" / "report.json"), streaming=True), "sft",
                                 "raise", "auto", {}))
