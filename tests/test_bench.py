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
def test_every_configuration_builds_trl_arguments(tmp_path, monkeypatch, name):
    """The overrides each worker composes are valid for the schema and for TRL 1.16's own config."""
    from trl import DPOConfig, SFTConfig

    from mistral_tune.config import compose
    from mistral_tune.training import trainers
    from mistral_tune.training.trainers import trl_args

    bench = _bench()
    monkeypatch.setattr(trainers, "liger_usable", lambda: True)  # Liger rows are refused where Triton is missing
    args = bench.parse_args(["--workdir", str(tmp_path), "--steps", "5", "--dpo-steps", "4", "--batch-size", "3"])
    stage, side, peft, extra = bench.CONFIGS[name]
    cfg = compose(bench.overrides(args, [f"peft={peft}", *bench.stage_overrides(stage, extra)]))
    built = trl_args(cfg, stage, SFTConfig if stage == "sft" else DPOConfig, tmp_path, [])
    assert built.max_steps == (5 if stage == "sft" else 4)
    assert built.per_device_train_batch_size == (3 if stage == "sft" else args.dpo_batch_size)
    assert cfg.model.config.hidden_size == 256 and cfg.model.config.num_attention_heads == 8
    if stage == "sft":
        assert built.padding_free == (not name.endswith("/trl"))  # TRL's default pads; the pipeline's does not
    else:
        assert built.precompute_ref_log_probs == ("precompute" in name)
    # TRL's rows: SDPA and no Liger as a plain TRL user gets them, or flex_attention + Liger ("best");
    # mistral_tune's rows: the pipeline's own choice (auto)
    attention = {"trl": "flex_attention" if " best" in name else "sdpa", "mistral_tune": "auto"}[side]
    assert cfg.model.attn_implementation == attention
    assert built.use_liger_kernel == name.endswith("liger")
    assert cfg.peft.method == peft


def test_default_configurations_follow_the_device(monkeypatch):
    import torch

    bench = _bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = bench.parse_args([]).configs
    assert cpu == bench.DEFAULT_CONFIGS and not set(cpu) & set(bench.GPU_CONFIGS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = bench.parse_args([]).configs
    assert "sft/trl best" in gpu and "dpo-full/trl best" in gpu and "sft/trl" in gpu


def test_real_layer_shape(tmp_path):
    from mistral_tune.config import compose

    bench = _bench()
    args = bench.parse_args(["--shape", "mistral-7b", "--layers", "2", "--workdir", str(tmp_path)])
    config = compose(bench.overrides(args)).model.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.num_hidden_layers) == (4096, 14336, 32, 8, 128, 2)
    assert bench.model_dir(args).name == "mistral-7b-l2-seed0"


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
        "sft/trl": dict(row, side="trl", tokens_per_s=50.0),
        "sft/trl padding_free": dict(row, side="trl"),
        "sft/mistral_tune": dict(row, side="mistral_tune", tokens_per_s=300.0, peak_rss_mb=600.0,
                                 model_flops_per_s=3e9),
        "dpo-lora/trl": dict(row, side="trl", stage="dpo", pairs_per_s=1.0),
        "dpo-lora/trl best": dict(row, side="trl", stage="dpo", failed="exit 1: no CUDA"),
        "dpo-lora/mistral_tune": dict(row, side="mistral_tune", stage="dpo", pairs_per_s=2.5),
    }
    bench.add_derived(results, {"flops": 1e11})
    mt = results["sft/mistral_tune"]
    assert mt["trl_best"] == "sft/trl padding_free"  # the fastest TRL row of the mode
    assert mt["speedup"] == pytest.approx(3.0) and mt["speedup_default"] == pytest.approx(6.0)
    assert mt["rss_ratio"] == pytest.approx(0.6)
    assert results["dpo-lora/mistral_tune"]["speedup"] == pytest.approx(2.5)  # pairs/s, not tokens/s
    assert results["dpo-lora/mistral_tune"]["trl_best"] == "dpo-lora/trl"  # a failed row is never the baseline
    assert mt["mfu"] == pytest.approx(0.03)
    text = bench.table(results)
    assert "| sft/mistral_tune | 300 |  | 1.000 | 600 | 3.0% | 6.00x | 3.00x | 0.60x | 1.0 |" in text
    assert "| dpo-lora/trl best | failed: exit 1: no CUDA |" in text
    assert "peak RSS (MB)" in text
    assert len(text.splitlines()) == 2 + len(results)
    results["sft/mistral_tune"]["peak_cuda_mb"] = 200.0  # on CUDA the column is GPU memory
    assert "peak GPU memory (MB)" in bench.table(results)


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
           "--batch-size", "2", "--dpo-batch-size", "2", "--configs", "sft/mistral_tune,dpo-full/trl,dpo-full/mistral_tune",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["results"]) == {"sft/mistral_tune", "dpo-full/trl", "dpo-full/mistral_tune"}
    assert not any("failed" in r for r in report["results"].values())
    assert report["results"]["dpo-full/trl"]["id_mismatches"] == 0  # TRL's chat-template ids == ours
    assert report["gemm_peak"]["flops"] > 0
    assert "| dpo-full/trl |" in out.with_suffix(".md").read_text()


def test_a_configuration_past_its_timeout_is_a_failed_row_not_a_hang(tmp_path):
    """On the GPU a stalled configuration once ate the whole device budget: --config-timeout ends it."""
    bench = _bench()
    args = bench.parse_args(["--workdir", str(tmp_path), "--config-timeout", "0.5", "--configs", "sft/trl"])
    row = bench.run_worker(args, "sft/trl", ["--workdir", str(tmp_path)])
    assert row == {"stage": "sft", "side": "trl", "failed": "no result in 0.5 s (--config-timeout)"}
