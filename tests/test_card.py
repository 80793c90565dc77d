"""The model card describes the merged model it sits beside: eval's results only when they were
made of that model, GGUF files only when exported from it, the run's own stages, and the reward
reference of each row. Built on hand-written run folders (the end-to-end cards are checked in
test_evaluate and test_export)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mistral_tune import card
from mistral_tune.config import compose
from mistral_tune.runs import RunDir

RESULTS = {
    "base": {"task_score": 0.0, "preferred_rate": 0.02, "reference": None},
    "sft": {"task_score": 0.4, "preferred_rate": 0.05, "reference": "base", "samples": [
        {"prompt": "What is 1 + 2?", "reference": "1 + 2 = 3", "generation": "1 + 2 = 3\nHope this helps!",
         "correct": True}]},
    "kto": {"task_score": 0.41, "preferred_rate": 0.9, "reference": "sft", "samples": [
        {"prompt": "What is 1 + 2?", "reference": "1 + 2 = 3", "generation": "1 + 2 = 3", "correct": True}]},
}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))


def _run(tmp_path: Path, stages=("sft", "kto"), eval_merge="m1") -> Path:
    """A run folder of stages=[sft,kto]: merged model (fingerprint m1), eval made of merge `eval_merge`."""
    run = tmp_path / "run"
    _write(run / "merged" / "config.json", {"model_type": "mistral"})
    _write(run / "merged" / "config.yaml", {"stages": list(stages)})
    _write(run / "merged" / "manifest.json", {"stage": "merge", "fingerprint": "m1"})
    for stage in stages:
        _write(run / stage / "config.yaml", {stage: {"trainer": {"learning_rate": 1e-4, "beta": 0.3}}})
        _write(run / stage / "manifest.json", {"stage": stage, "fingerprint": f"f-{stage}", "method": "none",
                                               "metrics": {"global_step": 3, "train_loss": 1.0}})
    _write(run / "eval" / "manifest.json", {"stage": "eval", "fingerprint": "e1", "merge": eval_merge})
    _write(run / "eval" / "results.json", RESULTS)
    return run


def _card(run: Path, *overrides: str) -> str:
    path = card.write_card(compose([f"run_dir={run}", *overrides]))
    return path.read_text()


def test_a_card_written_without_results_keeps_evals_of_this_merged_model(tmp_path):
    """export (and merge when nothing changed) rewrite the card: the evaluation table stays."""
    text = _card(_run(tmp_path), "stages=[sft,kto]")
    assert "## Evaluation" in text and "Not evaluated yet" not in text
    assert "preferred_rate" in text and "0.900" in text  # the table
    meta = yaml.safe_load(text.split("---")[1])
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"task_score": 0.41, "preferred_rate": 0.9}  # the kto row: the merged model's
    assert "Sample generations (kto)" in text
    assert "base for sft, sft for kto" in text  # each row's reward reference, not "SFT for DPO"


def test_results_of_another_merged_model_are_not_shown(tmp_path):
    text = _card(_run(tmp_path, eval_merge="m0"), "stages=[sft,kto]")  # eval made before merge was redone
    assert "Not evaluated yet" in text and "model-index" not in text


def test_the_card_describes_the_runs_stages_not_the_commands(tmp_path):
    """`mistral-tune export run_dir=X` without stages=[sft,kto] (the default is [sft,dpo])."""
    text = _card(_run(tmp_path))
    assert "data -> sft -> kto -> merge" in text and "### kto" in text
    assert "model-index" in text.split("---")[1]


def test_model_index_claims_nothing_when_the_merged_model_was_not_evaluated(tmp_path):
    run = _run(tmp_path)
    _write(run / "eval" / "results.json", {k: RESULTS[k] for k in ("base", "sft")})  # eval.models=[base,sft]
    text = _card(run, "stages=[sft,kto]")
    assert "model-index" not in text.split("---")[1] and "Sample generations (sft)" in text


def test_the_gguf_section_lists_only_files_made_from_this_merged_model(tmp_path):
    run = _run(tmp_path)
    entry = {"quant": "q8_0", "bytes": 10_300_000, "sliding_window_note": None}
    _write(run / "export" / "manifest.json", {"files": {
        "run-q8_0.gguf": {**entry, "gguf": "run-q8_0.gguf", "modelfile": "run-q8_0.Modelfile",
                          "source": str(run / "merged"), "source_key": "m1"},
        "old-f16.gguf": {**entry, "gguf": "old-f16.gguf", "modelfile": "old-f16.Modelfile", "quant": "f16",
                         "source": str(run / "merged"), "source_key": "m0"},  # merge since redone
        "other-q8_0.gguf": {**entry, "gguf": "other-q8_0.gguf", "modelfile": "other-q8_0.Modelfile",
                            "source": str(tmp_path / "elsewhere"), "source_key": "x"},  # export.model=...
    }})
    lines = "\n".join(card._gguf_lines(RunDir(run)))
    assert "`run-q8_0.gguf`" in lines and "old-f16" not in lines and "other-q8_0" not in lines
