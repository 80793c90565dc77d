"""End to end through the real CLI, on the tiny model and the bundled data."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import wandb_run_summary

SHORT = ["sft.trainer.max_steps=3", "dpo.trainer.max_steps=3", "sft.trainer.logging_steps=1", "dpo.trainer.logging_steps=1", "sft.data.limit=64", "dpo.data.limit=32"]


def cli(*args, env=None, check=True):
    env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def manifest(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    cli("pipeline", f"run_dir={run_dir}", *SHORT)  # logger=wandb (offline) is the default
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora")
    cli("pipeline", f"run_dir={run_dir}", "peft=lora", "logger=none", *SHORT)
    return run_dir


@pytest.mark.slow
def test_pipeline_writes_every_stage(full_run):
    for folder in ("data/sft", "data/dpo", "sft", "dpo", "merged"):
        assert (full_run / folder / "manifest.json").exists(), folder
        assert (full_run / folder / "config.yaml").exists(), folder
    for stage in ("sft", "dpo"):
        metrics = json.loads((full_run / stage / "metrics.json").read_text())
        assert metrics["tokens"] > 0 and metrics["train_runtime"] > 0 and metrics["tokens_per_second"] > 0
    assert manifest(full_run, "sft")["method"] == "none"  # the tiny model trains fully
    assert manifest(full_run, "dpo")["model"] == {"base": str(full_run / "dpo"), "adapters": []}
    report = json.loads((full_run / "data" / "sft" / "report.json").read_text())
    assert report["kept"] == 64 and report["trained_tokens"] > 0


@pytest.mark.slow
def test_merged_checkpoint_is_chat_ready(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = full_run / "merged"
    assert list(merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s>[INST] What is 2 + 3? [/INST]"
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_wandb_offline_runs_hold_config_and_losses(full_run):
    files = sorted(glob.glob(str(full_run / "wandb" / "offline-run-*" / "run-*.wandb")))
    runs = {s["run"].display_name: s for s in map(wandb_run_summary, files)}
    assert set(runs) == {"sft", "dpo", "eval"}
    assert len({s["run"].run_group for s in runs.values()}) == 1  # one group per run_dir
    for stage in ("sft", "dpo"):
        summary = runs[stage]
        assert summary["config"]["run_dir"] == str(full_run)  # the resolved Hydra config
        assert summary["config"][stage]["trainer"]["max_steps"] == 3
        losses = [h["train/loss"] for h in summary["history"] if "train/loss" in h]
        assert losses and all(isinstance(x, float) for x in losses)


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_refuses_changed_config(full_run):
    again = cli("pipeline", f"run_dir={full_run}", *SHORT)
    assert again.stderr.count("already complete") >= 4
    changed = cli("pipeline", f"run_dir={full_run}", *SHORT[:-1], "dpo.data.limit=16", check=False)
    assert changed.returncode == 2
    assert "different config" in changed.stderr and "Traceback" not in changed.stderr


@pytest.mark.slow
def test_lora_merge_really_merges(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = manifest(lora_run, "merged")
    assert m["model"]["adapters"] == [str(lora_run / "sft"), str(lora_run / "dpo")]
    assert m["probe_max_abs_diff"] <= 1e-3
    assert (lora_run / "sft" / "adapter_config.json").exists()
    assert not (lora_run / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged")
    base = AutoModelForCausalLM.from_pretrained(lora_run / "base")
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)

    # The merged weights equal base + SFT adapter (merged) + DPO adapter, applied as adapters.
    chain = PeftModel.from_pretrained(base, lora_run / "sft").merge_and_unload()
    chain = PeftModel.from_pretrained(chain, lora_run / "dpo").eval()
    ids = torch.tensor([[1, 733, 16289, 28793, 1824, 349, 28705, 28750, 28804, 733, 28748, 16289, 28793]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, chain(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.extended
def test_sweep_jobs_write_numbered_folders(tmp_path):
    cli("sft", "-m", f"run_dir={tmp_path}", "logger=none", "sft.trainer.max_steps=1", "sft.data.limit=16",
        "dpo.data.limit=8", "sft.trainer.learning_rate=1e-3,2e-3")
    for k in ("0", "1"):
        m = manifest(tmp_path / k, "sft")
        assert m["stage"] == "sft"
    import yaml

    seen = [yaml.safe_load((tmp_path / k / "sft" / "config.yaml").read_text())["sft"]["trainer"]["learning_rate"]
            for k in "01"]
    assert seen == [1e-3, 2e-3]
