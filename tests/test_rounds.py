"""Iterative on-policy DPO (`pairs=onpolicy pairs.rounds=N`, mistral_tune/stages/rounds.py): each
round samples from the model the round before left, trains from it against it as the reference;
merge and eval take the last round; a rerun skips finished rounds. Tiny model; seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mistral_tune import runs
from mistral_tune.config import compose
from mistral_tune.errors import UserError
from mistral_tune.stages import pipeline, rounds

TINY = ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=2",
        "model.config.head_dim=8"]
# DPO from the base (stages=[dpo]) on 6 prompts x 3 samples, scored by length so every round pairs.
ROUNDS = ["pairs=onpolicy", "stages=[dpo]", "logger=none", *TINY, "pairs.max_prompts=6", "pairs.num_samples=3",
          "pairs.max_new_tokens=6", "pairs.temperature=2.0", "pairs.reward=tests.test_pairs:length_reward",
          "dpo.trainer.max_steps=2", "eval.max_samples=8"]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_rounds_need_onpolicy_pairs_and_dpo_last(tmp_path):
    with pytest.raises(UserError, match="needs pairs=onpolicy"):
        rounds.count(compose([f"run_dir={tmp_path}", "pairs.rounds=2"]))
    with pytest.raises(UserError, match="does not end with dpo"):
        rounds.count(compose([f"run_dir={tmp_path}", "pairs=onpolicy", "pairs.rounds=2", "stages=[dpo,sft]"]))
    with pytest.raises(UserError, match="1 or more"):
        rounds.count(compose([f"run_dir={tmp_path}", "pairs=onpolicy", "pairs.rounds=0"]))
    assert rounds.count(compose([f"run_dir={tmp_path}", "pairs=onpolicy", "pairs.rounds=3"])) == 3


def test_a_launched_round_composes_the_config_the_pipeline_gives_it(tmp_path):
    """The ranks of a launched round compose their config from the command line; the stages they
    run must see what the pipeline's round config says, or they would redo (or refuse) its pairs
    and data."""
    given = [f"run_dir={tmp_path}", "pairs=onpolicy", "pairs.rounds=3", "stages=[sft,dpo]", "seed=7",
             "dpo.trainer.beta=0.2"]
    cfg = compose(given)
    for r in (2, 3):
        mine = rounds.config(cfg, r)
        launched = compose(rounds.overrides(cfg, r, given))
        assert Path(mine.run_dir) == tmp_path.resolve() / "rounds" / str(r)
        assert list(mine.dpo.data.files) == [str(tmp_path.resolve() / "rounds" / str(r) / "pairs" / "pairs.jsonl")]
        for stage in ("pairs", "data/dpo", "dpo"):
            assert runs.stage_config(launched, stage) == runs.stage_config(mine, stage), stage
        assert launched.run_dir == mine.run_dir and list(launched.stages) == ["sft", "dpo"]


def test_two_rounds_chain_and_merge_and_eval_take_the_last(tmp_path):
    cfg = compose([f"run_dir={tmp_path}", *ROUNDS, "pairs.rounds=2"])
    pipeline.run(cfg, [])
    top, second = _manifest(tmp_path / "dpo"), _manifest(tmp_path / "rounds" / "2" / "dpo")
    link = _manifest(tmp_path / "rounds" / "2" / "sft")
    # Round 2 starts from round 1's model: its pairs were sampled from it, its DPO trained from it.
    assert link["model"] == top["model"] and link["round"] == 2
    assert _manifest(tmp_path / "rounds" / "2" / "pairs")["policy"] == top["model"]
    assert second["model"] == {"base": str(tmp_path.resolve() / "rounds" / "2" / "dpo"), "adapters": []}
    assert second["metrics"]["pairs"] > 0
    # Round 2's samples are its own (another model, another seed), not round 1's again.
    assert (tmp_path / "rounds" / "2" / "pairs" / "pairs.jsonl").read_text() != (tmp_path / "pairs" / "pairs.jsonl").read_text()
    merged = _manifest(tmp_path / "merged")
    assert merged["model"] == second["model"] and merged["from"] == "dpo_round2"
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results) == ["base", "dpo", "dpo_round2"]
    assert results["dpo_round2"]["reference"] == "dpo" and results["dpo"]["reference"] == "base"
    assert results["dpo_round2"]["model"] == second["model"]
    # A rerun finds every round finished and trains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("manifest.json")}
    pipeline.run(cfg, [])
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("manifest.json")} == stamps
    # Round 1 redone (another beta, force=true) is a new start for round 2: redone too, not reused.
    pipeline.run(compose([f"run_dir={tmp_path}", *ROUNDS, "pairs.rounds=2", "dpo.trainer.beta=0.5", "force=true"]), [])
    redone = _manifest(tmp_path / "dpo")
    assert redone["fingerprint"] != top["fingerprint"]
    assert _manifest(tmp_path / "rounds" / "2" / "sft")["fingerprint"] == redone["fingerprint"]
    assert _manifest(tmp_path / "rounds" / "2" / "dpo")["fingerprint"] != second["fingerprint"]


def test_merge_refuses_an_unfinished_last_round(tmp_path):
    cfg = compose([f"run_dir={tmp_path}", *ROUNDS, "pairs.rounds=1"])
    pipeline.run(cfg, [])
    from mistral_tune.stages import merge

    with pytest.raises(UserError, match=r"rounds/2/dpo"):
        merge.run(compose([f"run_dir={tmp_path}", *ROUNDS, "pairs.rounds=2"]))


@pytest.mark.slow
@pytest.mark.extended
def test_rounds_under_a_two_process_launcher(tmp_path):
    """launcher=ddp: each round's pairs are sampled on both ranks and gathered, its DPO trains on
    both (the ranks compose the round's config from the command line, and reuse its pairs and
    data, not redo them), merge takes the last round."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "pipeline", f"run_dir={tmp_path}", "launcher=ddp",
                           *ROUNDS, "pairs.rounds=2"], cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    second = _manifest(tmp_path / "rounds" / "2" / "dpo")
    assert second["metrics"]["world_size"] == 2 and _manifest(tmp_path / "rounds" / "2" / "sft")["model"] == _manifest(tmp_path / "dpo")["model"]
    assert _manifest(tmp_path / "merged")["from"] == "dpo_round2"
    # The launched ranks found the round's pairs and data finished (one pairs run, one build).
    assert proc.stdout.count("pairs: already complete") + proc.stderr.count("pairs: already complete") >= 2
