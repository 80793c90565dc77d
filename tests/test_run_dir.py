"""The run folder contract: RunDir owns the layout, the chat format is fixed once by the data
stage, each dataset is built on its own inputs, and `stages=[...]` orders the training stages."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from mistral_tune import cli
from mistral_tune.config import compose
from mistral_tune.errors import UserError
from mistral_tune.formats import templates
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.runs import RunDir
from mistral_tune.stages import data, evaluate

PACKAGE = Path(__file__).resolve().parent.parent / "mistral_tune"
SHORT = ["logger=none", "sft.trainer.max_steps=2", "dpo.trainer.max_steps=2", "sft.data.limit=32", "dpo.data.limit=16"]


def test_only_run_dir_module_joins_paths_under_run_dir():
    """Every path of the layout comes from RunDir: no module builds `Path(cfg.run_dir) / ...`."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "runs.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"Path\(cfg\.run_dir\)\s*/|cfg\.run_dir\)\s*/\s*\"", line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_layout():
    rd = RunDir(Path("/r"))
    assert rd.stage("merge") == Path("/r/merged") and rd.stage("sft") == Path("/r/sft")
    assert rd.data("dpo") == Path("/r/data/dpo") and rd.dataset("dpo") == Path("/r/data/dpo/dataset")
    assert rd.chat_format == Path("/r/data/format.json") and rd.tokenizer == Path("/r/tokenizer")


@pytest.mark.slow
def test_sft_then_dpo_with_its_own_data_in_the_same_run_dir(tmp_path, caplog):
    """`mistral-tune sft`, then `mistral-tune dpo dpo.data.files=[prefs.jsonl]`: the DPO data is
    built from that file on its own, and the SFT data is neither rebuilt nor refused."""
    run = tmp_path / "run"
    assert cli.main(["sft", f"run_dir={run}", *SHORT]) == 0
    assert not (run / "data" / "dpo").exists()  # sft builds its own data only
    sft_data = (run / "data" / "sft" / "manifest.json").read_text()
    prefs = tmp_path / "prefs.jsonl"
    rows = (PACKAGE.parent / "data" / "dpo.jsonl").read_text().splitlines()[40:52]
    prefs.write_text("".join(line + "\n" for line in rows))
    assert cli.main(["dpo", f"run_dir={run}", *SHORT, f"dpo.data.files=[{prefs}]", "dpo.data.limit=null"]) == 0
    assert (run / "data" / "sft" / "manifest.json").read_text() == sft_data
    report = json.loads((run / "data" / "dpo" / "report.json").read_text())
    assert report["read"] == report["kept"] == 12 and list(report["per_file"]) == [str(prefs)]
    dpo = json.loads((run / "dpo" / "manifest.json").read_text())
    assert dpo["metrics"]["pairs"] == 12 and dpo["metrics"]["world_size"] == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mistral_tune"):
        assert cli.main(["sft", f"run_dir={run}", *SHORT]) == 0  # unchanged: both skipped
    skipped = [r.getMessage().split(":")[0] for r in caplog.records if "already complete" in r.getMessage()]
    assert skipped == ["data/sft", "sft"]


def test_chat_format_is_fixed_by_the_data_stage_and_read_by_eval(tmp_path):
    """chatml on a v3 model uses the v3 vocabulary everywhere; eval once re-derived it as v1."""
    run = tmp_path / "run"
    cfg = compose([f"run_dir={run}", "model=mistral_7b_v0_3", "template=chatml", "sft.data.limit=8", "dpo.data.limit=8"])
    data.ensure(cfg, "sft")
    fmt = ChatFormat.load(RunDir(run), "eval")
    assert fmt == ChatFormat("chatml", "mistral_v3")
    held_out = evaluate.load_eval_data(cfg, fmt)
    messages = [{"role": "user", "content": "Which is larger: 36 or 62?"}]
    v3 = templates.encode_prompt(messages, "chatml", vocab="mistral_v3")
    assert fmt.encode_prompt(messages) == v3 != templates.encode_prompt(messages, "chatml", vocab="mistral_v1")
    built = json.loads((run / "data" / "format.json").read_text())
    assert built == {"template": "chatml", "vocab": "mistral_v3"}
    assert held_out["prompts"] and all(max(p["ids"]) < 32768 for p in held_out["prompts"])


def test_a_run_dir_has_one_chat_format(tmp_path):
    run = tmp_path / "run"
    data.ensure(compose([f"run_dir={run}", "sft.data.limit=8"]), "sft")
    with pytest.raises(UserError, match="built with template mistral_v1"):
        data.ensure(compose([f"run_dir={run}", "template=zephyr", "dpo.data.limit=8"]), "dpo")


@pytest.mark.parametrize("stages, message", [
    ("[sft,sft]", "give each training stage once"),
    ("[sft,ppo]", "unknown: ppo"),
    ("[]", "give each training stage once"),
])
def test_stage_list_is_checked_at_compose(stages, message):
    with pytest.raises(UserError, match=message):
        compose([f"stages={stages}"])


def test_a_stage_outside_the_list_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"dpo is not in stages=\['sft'\]"):
        cli.run_command("dpo", compose([f"run_dir={tmp_path}", "stages=[sft]", *SHORT]), [])


def test_eval_references_follow_the_stage_list():
    assert evaluate.references(compose(["stages=[sft,dpo]"])) == {"sft": "base", "dpo": "sft"}
    assert evaluate.references(compose(["stages=[orpo]"])) == {"orpo": "base"}


@pytest.mark.slow
def test_dpo_first_in_the_list_starts_from_the_base_model(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["pipeline", f"run_dir={run}", "stages=[dpo]", *SHORT, "eval.max_samples=4"]) == 0
    dpo = json.loads((run / "dpo" / "manifest.json").read_text())
    assert not (run / "sft").exists() and not (run / "data" / "sft").exists()
    assert json.loads((run / "merged" / "manifest.json").read_text())["from"] == "dpo"
    assert dpo["model"] == {"base": str(run / "dpo"), "adapters": []}
    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results) == ["base", "dpo"] and results["dpo"]["reference"] == "base"


@pytest.mark.slow
def test_orpo_as_a_single_stage_pipeline(tmp_path):
    """`mistral-tune pipeline "stages=[orpo]"`: data -> orpo -> merge -> eval from the base model,
    with no reference model; a chat-ready merged model and an orpo row in the results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    assert cli.main(["pipeline", f"run_dir={run}", "stages=[orpo]", "logger=none", "orpo.trainer.max_steps=2",
                     "orpo.data.limit=32", "eval.max_samples=4"]) == 0
    orpo = json.loads((run / "orpo" / "manifest.json").read_text())
    assert orpo["metrics"]["global_step"] == 2 and orpo["metrics"]["tokens"] > 0
    assert sorted(p.name for p in (run / "data").iterdir()) == ["format.json", "orpo"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results) == ["base", "orpo"] and results["orpo"]["reference"] == "base"
    tok = AutoTokenizer.from_pretrained(run / "merged")
    model = AutoModelForCausalLM.from_pretrained(run / "merged")
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]
    assert "orpo" in (run / "merged" / "README.md").read_text()
