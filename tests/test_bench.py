"""bench/run.py: every configuration composes into real TRL arguments; the report is well formed;
(slow) one tiny end-to-end run of both sides."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(_bench().CONFIGS))
def test_every_configuration_builds_trl_arguments(tmp_path, name):
    """The overrides each worker composes are valid for the schema and for TRL 1.16's own config."""
    from trl import DPOConfig, SFTConfig

    from mistral_tune.config import compose
    from mistral_tune.training.trainers import trl_args

    bench = _bench()
    args = bench.parse_args(["--workdir", str(tmp_path), "--steps", "5", "--dpo-steps", "4", "--batch-size", "3"])
    stage, side, peft, extra = bench.CONFIGS[name]
    cfg = compose(bench.overrides(args, [f"peft={peft}", *extra]))
    built = trl_args(cfg, stage, SFTConfig if stage == "sft" else DPOConfig, tmp_path, [])
    assert built.max_steps == (5 if stage == "sft" else 4)
    assert built.per_device_train_batch_size == (3 if stage == "sft" else args.dpo_batch_size)
    assert cfg.model.config.hidden_size == 256 and cfg.model.config.num_attention_heads == 8
    if stage == "sft":
        assert built.padding_free == (name != "sft/trl")  # TRL's default pads; the pipeline's default does not
    else:
        assert built.precompute_ref_log_probs == ("precompute" in name)


def test_arguments_are_checked():
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "sft/nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "2", "--warmup", "2"])
    assert bench.parse_args(["--configs", "all"]).configs == list(bench.CONFIGS)


def test_table_compares_each_mode_with_its_trl_baseline():
    bench = _bench()
    row = dict(stage="sft", tokens_per_s=100.0, step_s=1.0, peak_rss_mb=1000.0, model_flops_per_s=1e9, setup_s=1.0)
    results = {
        "sft/trl padding_free": dict(row),
        "sft/mistral_tune": dict(row, tokens_per_s=300.0, peak_rss_mb=600.0, model_flops_per_s=3e9),
        "dpo-lora/trl": dict(row, stage="dpo", pairs_per_s=1.0),
        "dpo-lora/mistral_tune": dict(row, stage="dpo", pairs_per_s=2.5),
    }
    bench.add_derived(results, {"flops": 1e11})
    assert results["sft/mistral_tune"]["speedup"] == pytest.approx(3.0)
    assert results["sft/mistral_tune"]["rss_ratio"] == pytest.approx(0.6)
    assert results["dpo-lora/mistral_tune"]["speedup"] == pytest.approx(2.5)  # pairs/s, not tokens/s
    assert results["sft/mistral_tune"]["mfu"] == pytest.approx(0.03)
    text = bench.table(results)
    assert "| sft/mistral_tune | 300 |  | 1.000 | 600 | 3.0% | 3.00x | 0.60x |" in text
    assert len(text.splitlines()) == 2 + len(results)


@pytest.mark.slow
@pytest.mark.extended
def test_bench_runs_end_to_end(tmp_path):
    """A tiny model, 3 steps, one configuration of each side; writes the table and the JSON."""
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    sft.write_text("".join((REPO / "data" / "sft.jsonl").read_text().splitlines(keepends=True)[:24]))
    dpo.write_text("".join((REPO / "data" / "dpo.jsonl").read_text().splitlines(keepends=True)[:12]))
    out = tmp_path / "results" / "latest"
    cmd = [sys.executable, str(REPO / "bench" / "run.py"), "--hidden-size", "32", "--layers", "1",
           "--sft-data", str(sft), "--dpo-data", str(dpo), "--steps", "3", "--dpo-steps", "3", "--warmup", "1",
           "--batch-size", "2", "--dpo-batch-size", "2", "--configs", "sft/mistral_tune,dpo-full/trl",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["results"]) == {"sft/mistral_tune", "dpo-full/trl"}
    assert report["results"]["dpo-full/trl"]["id_mismatches"] == 0  # TRL's chat-template ids == ours
    assert report["gemm_peak"]["flops"] > 0
    assert "| dpo-full/trl |" in out.with_suffix(".md").read_text()
