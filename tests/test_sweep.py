"""Sweeps: the objective each job returns, and the summary of all jobs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from mistral_tune import sweep
from mistral_tune.config import compose
from mistral_tune.errors import UserError


def test_read_objective_from_stage_metrics_and_eval_results(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.json").write_text(json.dumps({"train_loss": 1.25}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"dpo": {"task_score": 0.5}}))
    assert sweep.read_objective(tmp_path, "sft/train_loss") == 1.25
    assert sweep.read_objective(tmp_path, "eval/dpo/task_score") == 0.5
    with pytest.raises(UserError, match="no 'tokens'"):
        sweep.read_objective(tmp_path, "sft/tokens")
    with pytest.raises(UserError, match="does not exist"):
        sweep.read_objective(tmp_path, "dpo/train_loss")


def test_default_objective_and_direction(tmp_path):
    cfg = compose([f"run_dir={tmp_path}"])
    assert sweep.objective_name(cfg, "sft") == "sft/train_loss" and sweep.direction(cfg, "sft/train_loss") == "minimize"
    assert sweep.objective_name(cfg, "pipeline") == "eval/dpo/task_score"
    assert sweep.direction(cfg, "eval/dpo/task_score") == "maximize"
    cfg = compose([f"run_dir={tmp_path}", "sweep.objective=eval/sft/eval_loss"])
    assert sweep.objective_name(cfg, "pipeline") == "eval/sft/eval_loss"


def test_summary_sorts_best_first_and_is_saved(tmp_path):
    jobs = [{"job": 0, "overrides": ["a=1"], "run_dir": "r/0", "objective": 0.2},
            {"job": 1, "overrides": ["a=2"], "run_dir": "r/1", "objective": 0.9},
            {"job": 2, "overrides": ["a=3"], "run_dir": "r/2", "objective": None, "error": "boom"}]
    text = sweep.write_summary(tmp_path, jobs, "eval/dpo/task_score", "maximize")
    order = [line.split()[0] for line in text.splitlines()[1:]]
    assert order == ["1", "0", "2"] and "failed" in text.splitlines()[-1]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["jobs"] == jobs and (tmp_path / "sweep.md").read_text().count("r/") == 3


@pytest.mark.slow
def test_jobs_that_differ_only_in_seed_get_a_mean_and_spread_table(tmp_path):
    """`pipeline -m seed=0,1,2` ends with eval's figures as mean ± sample sd over the seeds; jobs
    with other overrides are grouped apart, a group of one has no spread and is left out."""
    jobs = []
    scores = {"0": 0.40, "1": 0.44, "2": 0.48}
    for k, (seed, lr) in enumerate([("0", "a"), ("1", "a"), ("2", "a"), ("0", "b")]):
        run = tmp_path / str(k)
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "results.json").write_text(json.dumps({
            "sft": {"task_score": scores[seed], "preference_accuracy": 0.9, "eval_loss": 0.25},
            "dpo": {"task_score": scores[seed] + 0.1, "preference_accuracy": None,
                    "preferred_rate": 0.5 + float(seed) / 10}}))
        jobs.append({"job": k, "overrides": [f"seed={seed}", f"lr={lr}"], "run_dir": str(run), "objective": 0.0})
    jobs.append({"job": 4, "overrides": ["seed=3", "lr=a"], "run_dir": str(tmp_path / "4"), "objective": None,
                 "error": "failed"})
    groups = sweep.seed_groups(jobs)
    assert list(groups) == ["lr=a"] and groups["lr=a"]["seeds"] == ["seed=0", "seed=1", "seed=2"]
    sft = groups["lr=a"]["models"]["sft"]
    assert sft["task_score"] == pytest.approx([0.44, 0.04]) and sft["preference_accuracy"] == pytest.approx([0.9, 0.0])
    # preference_accuracy None: not averaged; the gain over sft is the same 0.1 on every seed.
    # preferred_rate only on dpo: averaged there, no gain without it on the model before.
    assert groups["lr=a"]["models"]["dpo"] == {"task_score": pytest.approx([0.54, 0.04]),
                                               "preferred_rate": pytest.approx([0.6, 0.1]),
                                               "task_score_gain": pytest.approx([0.1, 0.0])}
    assert "task_score_gain" not in sft  # the first model has none before it
    text = sweep.write_summary(tmp_path, jobs, "eval/dpo/task_score", "maximize")
    assert "eval over 3 seeds (seed=0; seed=1; seed=2), lr=a: mean ± sd" in text
    assert "sft    0.440 ± 0.040" in text and "+0.100 ± 0.000" in text
    assert json.loads((tmp_path / "sweep.json").read_text())["over_seeds"]["lr=a"]["models"]["sft"]["eval_loss"] == [0.25, 0.0]


def test_sweep_returns_objectives_and_writes_summary(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "sft", "-m", f"run_dir={tmp_path}", "logger=none",
                           "sft.trainer.max_steps=2", "sft.data.limit=16", "dpo.data.limit=8",
                           "sft.trainer.learning_rate=1e-3,3e-3"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["objective"] == "sft/train_loss" and len(saved["jobs"]) == 2
    for job in saved["jobs"]:
        metrics = json.loads((tmp_path / str(job["job"]) / "sft" / "metrics.json").read_text())
        assert job["objective"] == metrics["train_loss"]
    assert "sweep: 2 job(s)" in proc.stdout and "sft.trainer.learning_rate=0.003" in proc.stdout  # as Hydra writes it


def test_hparams_search_configs_compose_when_the_optuna_sweeper_is_installed(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper is not installed")
    from mistral_tune.config import CONFIG_DIR

    for path in sorted((CONFIG_DIR / "hparams_search").glob("*.yaml")):
        cfg = compose([f"hparams_search={path.stem}", f"run_dir={tmp_path}"])
        assert sweep.objective_name(cfg, "pipeline") and sweep.direction(cfg, sweep.objective_name(cfg, "pipeline"))


def test_preferred_rate_gain_is_paired_seed_by_seed(tmp_path):
    """preferred_rate_gain: each seed's DPO minus SFT preferred_rate, then mean and sd (the plain
    differences computed here), not the difference of the two means' spreads."""
    jobs, sft_rates, dpo_rates = [], [0.2, 0.5, 0.3], [0.9, 1.0, 0.95]
    for k, (a, b) in enumerate(zip(sft_rates, dpo_rates)):
        run = tmp_path / str(k)
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "results.json").write_text(json.dumps({
            "sft": {"task_score": 0.4, "preferred_rate": a}, "dpo": {"task_score": 0.4, "preferred_rate": b}}))
        jobs.append({"job": k, "overrides": [f"seed={k}"], "run_dir": str(run), "objective": 0.0})
    dpo = sweep.seed_groups(jobs)[""]["models"]["dpo"]
    diffs = [b - a for a, b in zip(sft_rates, dpo_rates)]
    assert dpo["preferred_rate_gain"] == pytest.approx([statistics.fmean(diffs), statistics.stdev(diffs)])
    assert "preferred_rate_gain" in sweep.seed_table(sweep.seed_groups(jobs)).splitlines()[1]
