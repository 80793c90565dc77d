"""Interruption is a non-event: SIGKILL and resume, incomplete checkpoints, NaN, full disk, secrets."""

from __future__ import annotations

import json
import re
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mistral_tune.training.trainers import DiskGuard, last_checkpoint

STEPS = ["sft.trainer.max_steps=12", "sft.trainer.save_steps=4", "sft.data.limit=128", "dpo.data.limit=64",
         "dpo.trainer.max_steps=8", "dpo.trainer.save_steps=2", "dpo.trainer.per_device_train_batch_size=8",
         "logger=none"]


def cli(*args, env=None):
    env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mistral_tune", *args], capture_output=True, text=True, env=env)


def kill_during(stage: str, run_dir: Path, checkpoints: list[int]) -> str:
    """Start the stage, SIGKILL it when a randomly chosen checkpoint folder appears (often mid-save),
    then return what the re-run printed."""
    target = random.choice(checkpoints)
    proc = subprocess.Popen([sys.executable, "-m", "mistral_tune", stage, f"run_dir={run_dir}", *STEPS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / stage / f"checkpoint-{target}").exists():
        assert proc.poll() is None, "the stage ended before the kill"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / stage / "manifest.json").exists()
    rerun = cli(stage, f"run_dir={run_dir}", *STEPS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return f"killed at checkpoint-{target}\n" + rerun.stderr


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    for stage in ("sft", "dpo"):
        proc = cli(stage, f"run_dir={run_dir}", *STEPS)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_weights(uninterrupted, tmp_path):
    """Bit-exact: optimizer, scheduler, RNG and data position all come back (CPU, fixed seed)."""
    run_dir = tmp_path / "killed"
    log = kill_during("sft", run_dir, [8, 12])
    assert "resuming from" in log
    a, b = weights(uninterrupted / "sft"), weights(run_dir / "sft")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0, log

    log = kill_during("dpo", run_dir, [4, 6, 8])
    assert "resuming from" in log
    a, b = weights(uninterrupted / "dpo"), weights(run_dir / "dpo")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0, log


def test_incomplete_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    good, cut = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for path in (good, cut):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
    (good / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (cut / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    assert last_checkpoint(tmp_path) == str(good)
    assert "checkpoint-8 is incomplete" in caplog.text
    (tmp_path / "checkpoint-12").mkdir()  # created, nothing written yet
    assert last_checkpoint(tmp_path) == str(good)


def test_nan_loss_stops_with_the_step_number(tmp_path):
    proc = cli("sft", f"run_dir={tmp_path}", "sft.trainer.learning_rate=1e30", "sft.trainer.max_steps=6",
               "sft.data.limit=64", "dpo.data.limit=8", "logger=none")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"loss became (nan|inf|-inf) at step \d+", proc.stderr), proc.stderr[-500:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sft" / "manifest.json").exists()


def test_a_save_that_will_not_fit_is_refused(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from mistral_tune.errors import UserError
    from tests.helpers import tiny_mistral

    monkeypatch.setattr("shutil.disk_usage", lambda path: type("U", (), {"free": 1024})())
    control = TrainerControl(should_save=True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(UserError, match="not enough disk"):
        DiskGuard().on_step_end(args, TrainerState(global_step=7), control, model=tiny_mistral())
    control.should_save = False
    DiskGuard().on_step_end(args, TrainerState(global_step=8), control, model=tiny_mistral())


@pytest.mark.slow
def test_planted_secrets_never_reach_any_file(tmp_path):
    """Tokens in the environment must not appear in configs, manifests, cards, logs or W&B runs."""
    secrets = {"HF_TOKEN": "hf_PLANTEDsecret0123456789abcdef", "WANDB_API_KEY": "PLANTEDwandbkey0123456789abcdef012345",
               "HUGGING_FACE_HUB_TOKEN": "hf_PLANTEDsecretHUB9876543210"}
    proc = cli("pipeline", f"run_dir={tmp_path}", *[s for s in STEPS if s != "logger=none"], "logger=wandb",
               env={**secrets, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "wandb").exists()
    leaks = []
    for path in tmp_path.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            leaks += [f"{path}: {name}" for name, value in secrets.items() if value.encode() in blob]
    assert not leaks
    assert not any(value in proc.stdout + proc.stderr for value in secrets.values())


@pytest.mark.extended  # three CLI trainings (~36 s); the unit test below covers the decision
def test_a_stage_redone_with_force_starts_over_not_from_the_old_checkpoints(tmp_path):
    """`force=true` after a config change trains the new config from the start. It resumed from
    the old run's last checkpoint: at or past the new max_steps it trained nothing (train loss nan)
    and saved the old weights as the new result. Compared with the same config in a fresh run_dir."""
    short = ["sft.data.limit=64", "dpo.data.limit=8", "sft.trainer.save_steps=3", "logger=none"]
    redone, fresh = tmp_path / "redone", tmp_path / "fresh"
    first = cli("sft", f"run_dir={redone}", *short, "sft.trainer.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli("sft", f"run_dir={redone}", *short, "sft.trainer.max_steps=4", "sft.trainer.learning_rate=1e-3",
                "force=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" not in again.stderr and "deleting checkpoint-6" in again.stderr
    straight = cli("sft", f"run_dir={fresh}", *short, "sft.trainer.max_steps=4", "sft.trainer.learning_rate=1e-3")
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = weights(redone / "sft"), weights(fresh / "sft")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    metrics = json.loads((redone / "sft" / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["train_loss"] is not None


def test_checkpoints_of_another_config_are_not_resumed(tmp_path, caplog):
    """A crashed stage re-run with other settings: an error naming the change (its checkpoints are
    kept), force=true deletes them; the same settings resume; a folder from before started.json
    existed resumes as it always did."""
    from mistral_tune import runs
    from mistral_tune.config import compose
    from mistral_tune.errors import UserError

    base = [f"run_dir={tmp_path}", "logger=none"]
    crashed = compose([*base, "sft.trainer.learning_rate=1e-3"])
    runs.begin_training(crashed, "sft", {"data": "d"})
    checkpoint = tmp_path / "sft" / "checkpoint-4"
    checkpoint.mkdir()
    runs.begin_training(crashed, "sft", {"data": "d"})  # the same run again: resumes
    assert checkpoint.exists()
    with pytest.raises(UserError, match=r"sft\.trainer\.learning_rate: 0\.001 -> 0\.002") as err:
        runs.begin_training(compose([*base, "sft.trainer.learning_rate=2e-3"]), "sft", {"data": "d"})
    assert "force=true" in err.value.hint and checkpoint.exists()
    with pytest.raises(UserError, match="inputs did"):  # same config, rebuilt data
        runs.begin_training(crashed, "sft", {"data": "other"})
    caplog.set_level("INFO", logger="mistral_tune")
    runs.begin_training(compose([*base, "sft.trainer.learning_rate=2e-3", "force=true"]), "sft", {"data": "d"})
    assert not checkpoint.exists() and "deleting checkpoint-4" in caplog.text
    legacy = tmp_path / "legacy"
    (legacy / "sft" / "checkpoint-2").mkdir(parents=True)
    runs.begin_training(compose([f"run_dir={legacy}", "logger=none"]), "sft")
    assert (legacy / "sft" / "checkpoint-2").exists()
