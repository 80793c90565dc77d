"""`accelerate launch --config_file launch/accelerate/<mode>.yaml -m mistral_tune <stage>` on 2 processes.

The contract under a multi-process launcher: every rank resolves the same run_dir, only rank 0
writes files, manifests and W&B runs, and the `--local_rank=N` that launchers append never reaches
Hydra. The slow tests run the real launcher on CPU (torchrun + gloo; DeepSpeed picks its CPU
accelerator by itself) with the tiny model and 3 steps per stage.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "accelerate"
MODES = ("single", "ddp", "zero2", "zero3")
# Small and fast: 3 steps per stage, 4 rows per device.
SMALL = [
    "sft.trainer.max_steps=3",
    "dpo.trainer.max_steps=3",
    "sft.trainer.per_device_train_batch_size=4",
    "dpo.trainer.per_device_train_batch_size=4",
]


# ---------------------------------------------------------------------------------------------
# fast


@pytest.mark.parametrize(
    "argv",
    [
        ["sft", "--local_rank=1", "run_dir=x"],
        ["sft", "--local-rank=1", "run_dir=x"],
        ["sft", "--local_rank", "1", "run_dir=x"],
        ["sft", "--local-rank", "1", "run_dir=x"],
        ["--local_rank=1", "sft", "run_dir=x"],
    ],
)
def test_strip_launcher_args_removes_local_rank(argv):
    from mistral_tune.cli import _strip_launcher_args

    assert _strip_launcher_args(argv) == ["sft", "run_dir=x"]


def test_strip_launcher_args_keeps_everything_else():
    from mistral_tune.cli import _strip_launcher_args

    argv = ["dpo", "run_dir=runs/local_rank=1", "dpo.trainer.max_steps=3", "-m"]
    assert _strip_launcher_args(argv) == argv


@pytest.mark.parametrize("mode", MODES)
def test_launch_config_loads_with_accelerates_own_loader(mode):
    """accelerate rejects unknown keys; this is the loader `accelerate launch` uses."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(LAUNCH / f"{mode}.yaml"))
    assert cfg.mixed_precision == "no"  # precision comes from the trainer config, CPU and GPU alike
    assert not cfg.use_cpu  # `--cpu`/use_cpu would make accelerate start one plain process
    expected = {"single": ("NO", 1), "ddp": ("MULTI_GPU", 2), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 2)}
    assert (cfg.distributed_type.value, cfg.num_processes) == expected[mode]
    if mode.startswith("zero"):
        assert cfg.deepspeed_config["zero_stage"] == int(mode[-1])
    if mode == "zero3":
        assert cfg.deepspeed_config["zero3_save_16bit_model"] is True  # consolidated weights on save


# ---------------------------------------------------------------------------------------------
# slow: the real launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, stage: str, run_dir: Path, *overrides: str, env: dict | None = None):
    """Run one stage under `accelerate launch` with 2 processes; fail with the output's tail."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(LAUNCH / f"{mode}.yaml"),
        "--num_processes", "2",
        "--main_process_port", str(_free_port()),  # parallel test runs must not share 29500
        "-m", "mistral_tune", stage, f"run_dir={run_dir}", *SMALL, *overrides,
    ]
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    full_env.update(HF_HUB_OFFLINE="1", WANDB_SILENT="true", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    if proc.returncode != 0:
        lines = proc.stdout.splitlines()
        # torchrun's own traceback comes last and hides the rank's error: show that line first.
        errors = [line for line in lines
                  if re.search(r"mistral-tune \w+: error:|^(\[rank\d+\]: )?\w+(Error|Exception)\b", line)
                  and "ChildFailedError" not in line]
        tail = "\n".join(errors + ["..."] + lines[-30:])
        pytest.fail(f"{mode} {stage} exited with {proc.returncode}:\n{tail}")
    return proc


def _manifest(run_dir: Path, folder: str) -> dict:
    path = run_dir / folder / "manifest.json"
    assert path.is_file(), f"no manifest in {run_dir / folder}"
    return json.loads(path.read_text())


def _assert_one_writer(run_dir: Path, folders: set[str]) -> None:
    """Exactly the stage folders, one config.yaml each, and nothing a second rank left behind."""
    extra = {p.name for p in run_dir.iterdir()} - folders - {"base", "tokenizer", "wandb"}
    assert not extra, f"unexpected entries in run_dir (per-rank duplicates?): {sorted(extra)}"
    configs = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("config.yaml")
                     if "wandb" not in p.relative_to(run_dir).parts)
    assert configs == sorted(f"{f}/config.yaml" for f in folders)
    leftovers = [str(p) for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


def _assert_two_ranks_trained(stage_dir: Path) -> None:
    """The Trainer saves one RNG state per process: proof that the launch really had 2 ranks
    (`accelerate launch --cpu` silently runs a single process)."""
    checkpoint = stage_dir / "checkpoint-3"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory):
    """The same 3 SFT steps in one process with the same global batch (8 = 2 ranks x 4)."""
    run_dir = tmp_path_factory.mktemp("single")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "sft", f"run_dir={run_dir}", *SMALL,
                           "sft.trainer.per_device_train_batch_size=8", "logger=none"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "sft"


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> float:
    """Equivalence: distributed training with the same global batch reaches the same weights
    (the global batch holds the same rows; the loss is normalised over all ranks' tokens)."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    base = load_file(a.parent / "base" / "model.safetensors")
    moved = max((wa[k].float() - base[k].float()).abs().max().item() for k in wa)
    assert moved > 100 * atol, "training must move the weights, or equality proves nothing"
    assert diff <= atol, f"max |weight difference| {diff:.3g} > {atol}"
    return diff


@pytest.mark.slow
def test_ddp_sft_dpo_merge_two_processes(tmp_path, one_process_sft):
    run_dir = tmp_path / "run"
    wandb = {"WANDB_MODE": "offline"}
    launch("ddp", "sft", run_dir, "logger=wandb", env=wandb)
    launch("ddp", "dpo", run_dir, "logger=wandb", env=wandb)
    launch("ddp", "merge", run_dir, "logger=none")

    for folder in ("data", "sft", "dpo", "merged"):
        _manifest(run_dir, folder)
    _assert_same_weights(one_process_sft, run_dir / "sft")
    assert _manifest(run_dir, "sft")["metrics"]["global_step"] == 3
    assert _manifest(run_dir, "dpo")["metrics"]["global_step"] == 3
    assert _manifest(run_dir, "merged")["from"] == "dpo"
    _assert_two_ranks_trained(run_dir / "sft")
    _assert_two_ranks_trained(run_dir / "dpo")
    _assert_one_writer(run_dir, {"data", "sft", "dpo", "merged"})
    # One W&B run per stage, from rank 0 only, under run_dir/wandb.
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, [r.name for r in runs]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_deepspeed_zero2_sft_on_two_processes(tmp_path, one_process_sft):
    run_dir = tmp_path / "run"
    launch("zero2", "sft", run_dir, "logger=none")
    _manifest(run_dir, "sft")
    _assert_same_weights(one_process_sft, run_dir / "sft")
    _assert_two_ranks_trained(run_dir / "sft")
    _assert_one_writer(run_dir, {"data", "sft"})
    ds_config = _deepspeed_config(run_dir / "sft")
    assert ds_config["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_deepspeed_zero3_sft_dpo_saves_consolidated_weights(tmp_path, one_process_sft):
    """ZeRO-3 shards parameters; zero3_save_16bit_model gathers them at save time, so the next
    stage (DPO, whose frozen reference model is sharded too) loads an ordinary checkpoint."""
    run_dir = tmp_path / "run"
    launch("zero3", "sft", run_dir, "logger=none")
    _assert_same_weights(one_process_sft, run_dir / "sft")
    launch("zero3", "dpo", run_dir, "logger=none")
    for stage in ("sft", "dpo"):
        _manifest(run_dir, stage)
        _assert_two_ranks_trained(run_dir / stage)
        ds_config = _deepspeed_config(run_dir / stage)
        assert ds_config["zero_optimization"]["stage"] == 3
    _assert_one_writer(run_dir, {"data", "sft", "dpo"})

    from safetensors.torch import load_file
    from transformers import AutoConfig

    weights = load_file(run_dir / "dpo" / "model.safetensors")
    config = AutoConfig.from_pretrained(run_dir / "dpo")
    assert weights["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert all(t.numel() > 0 for t in weights.values()), "ZeRO-3 placeholders saved instead of weights"


def _deepspeed_config(stage_dir: Path) -> dict:
    """The DeepSpeed config recorded in the stage's last DeepSpeed checkpoint."""
    import torch

    states = sorted((stage_dir / "checkpoint-3").glob("global_step*/*optim_states.pt"))
    assert states, f"no DeepSpeed checkpoint in {stage_dir / 'checkpoint-3'}"
    return torch.load(states[0], map_location="cpu", weights_only=False)["ds_config"]


def test_slurm_script_starts_one_accelerate_launch_per_node(tmp_path):
    """launch/slurm.sbatch under fake srun/scontrol/accelerate: the command each node would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    # srun runs its command once per node, as SLURM would, with that node's SLURM_NODEID.
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    (bin_dir / "accelerate").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_GPUS_PER_NODE": "h100:8", "STAGE": "dpo"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "run_dir=/shared/r x",
                           "experiment=zephyr_7b_beta_full"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert f"--machine_rank {rank}" in call
        assert "--num_machines 2 --num_processes 16" in call
        assert "--main_process_ip node-a" in call
        assert call.endswith("-m mistral_tune dpo run_dir=/shared/r x experiment=zephyr_7b_beta_full")
