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
MODES = ("single", "ddp", "zero2", "zero3")  # run on 2 CPU processes below
# Every shipped accelerate config: (distributed_type, num_processes, num_machines).
CONFIGS = {
    "single": ("NO", 1, 1),
    "ddp": ("MULTI_GPU", 2, 1),
    "zero2": ("DEEPSPEED", 2, 1),
    "zero3": ("DEEPSPEED", 2, 1),
    "zero3_offload": ("DEEPSPEED", 2, 1),
    "zero3_multinode": ("DEEPSPEED", 16, 2),
    "fsdp2": ("FSDP", 2, 1),
}
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


def test_every_shipped_config_is_listed():
    """Adding a file to launch/accelerate/ means adding it here (and to launch/README.md's table)."""
    assert sorted(p.stem for p in LAUNCH.glob("*.yaml")) == sorted(CONFIGS)
    table = (REPO / "launch" / "README.md").read_text()
    for name in CONFIGS:
        assert f"`{name}.yaml`" in table, f"launch/README.md has no row for {name}.yaml"


@pytest.mark.parametrize("mode", sorted(CONFIGS))
def test_launch_config_loads_with_accelerates_own_loader(mode):
    """accelerate rejects unknown keys; this is the loader `accelerate launch` uses."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(LAUNCH / f"{mode}.yaml"))
    assert cfg.mixed_precision == "no"  # precision comes from the trainer config, CPU and GPU alike
    assert not cfg.use_cpu  # `--cpu`/use_cpu would make accelerate start one plain process
    assert (cfg.distributed_type.value, cfg.num_processes, cfg.num_machines) == CONFIGS[mode]
    if mode.startswith("zero"):
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == int(mode[4])
        offload = "cpu" if mode == "zero3_offload" else "none"
        assert (ds["offload_optimizer_device"], ds["offload_param_device"]) == (offload, offload)
        if ds["zero_stage"] == 3:
            assert ds["zero3_save_16bit_model"] is True  # consolidated weights on save
    if mode == "zero3_multinode":
        assert cfg.rdzv_backend == "c10d"  # nodes may start seconds apart
    if mode == "fsdp2":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # one safetensors model on save
        # The Trainer refuses FSDP's own checkpointing together with <stage>.trainer.activation_checkpointing.
        assert fsdp["fsdp_activation_checkpointing"] is False
        # accelerate raises at launch when cpu_ram_efficient_loading lacks sync_module_states.
        assert fsdp["fsdp_sync_module_states"] or not fsdp["fsdp_cpu_ram_efficient_loading"]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "launcher").glob("*.yaml")), ids=lambda p: p.stem)
def test_launcher_group_points_at_a_shipped_config(path):
    import yaml

    launcher = yaml.safe_load(path.read_text())
    assert launcher["name"] == path.stem
    if launcher["name"] != "none":
        assert launcher["config_file"] == f"launch/accelerate/{path.stem}.yaml"
        assert (REPO / launcher["config_file"]).is_file()


def test_fsdp_on_cpu_is_refused(monkeypatch, tmp_path):
    """accelerate 1.15 builds FSDP only from a GPU process group: on CPU an FSDP launch trains as
    plain DDP (state.py), so mistral_tune refuses it instead of running something else."""
    import torch
    from trl import SFTConfig

    from mistral_tune.config import compose
    from mistral_tune.errors import UserError
    from mistral_tune.training.trainers import trl_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for FSDP configs
    cfg = compose([f"run_dir={tmp_path}", "logger=none"])
    with pytest.raises(UserError, match="FSDP.*needs GPUs"):
        trl_args(cfg, "sft", SFTConfig, tmp_path / "sft", [])


# ---------------------------------------------------------------------------------------------
# slow: the real launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(mode: str, stage: str, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(LAUNCH / f"{mode}.yaml"),
        "--num_processes", "2",
        "--main_process_port", str(_free_port()),  # parallel test runs must not share 29500
        "-m", "mistral_tune", stage, f"run_dir={run_dir}", *SMALL, *overrides,
    ]


def launch(mode: str, stage: str, run_dir: Path, *overrides: str, env: dict | None = None):
    """Run one stage under `accelerate launch` with 2 processes; fail with the output's tail."""
    cmd = _launch_cmd(mode, stage, run_dir, *overrides)
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
    extra = {p.name for p in run_dir.iterdir()} - {f.split("/")[0] for f in folders} - {"base", "tokenizer", "wandb"}
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

    for folder in ("data/sft", "data/dpo", "sft", "dpo", "merged"):
        _manifest(run_dir, folder)
    _assert_same_weights(one_process_sft, run_dir / "sft")
    assert _manifest(run_dir, "sft")["metrics"]["global_step"] == 3
    assert _manifest(run_dir, "dpo")["metrics"]["global_step"] == 3
    assert _manifest(run_dir, "merged")["from"] == "dpo"
    _assert_two_ranks_trained(run_dir / "sft")
    _assert_two_ranks_trained(run_dir / "dpo")
    _assert_one_writer(run_dir, {"data/sft", "data/dpo", "sft", "dpo", "merged"})
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
@pytest.mark.extended
def test_deepspeed_zero2_sft_on_two_processes(tmp_path, one_process_sft):
    run_dir = tmp_path / "run"
    launch("zero2", "sft", run_dir, "logger=none")
    _manifest(run_dir, "sft")
    _assert_same_weights(one_process_sft, run_dir / "sft")
    _assert_two_ranks_trained(run_dir / "sft")
    _assert_one_writer(run_dir, {"data/sft", "sft"})
    ds_config = _deepspeed_config(run_dir / "sft")
    assert ds_config["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_deepspeed_zero3_sft_dpo_saves_consolidated_weights(tmp_path, one_process_sft):
    """ZeRO-3 shards parameters; zero3_save_16bit_model gathers them at save time, so the next
    stage (DPO, whose frozen reference model is sharded too) loads an ordinary checkpoint."""
    run_dir = tmp_path / "run"
    launch("zero3", "sft", run_dir, "logger=none")
    _assert_same_weights(one_process_sft, run_dir / "sft")
    launch("zero3", "dpo", run_dir, "logger=none", "dpo.trainer.logging_steps=1")
    _assert_reference_is_the_start_policy(_manifest(run_dir, "dpo"))
    for stage in ("sft", "dpo"):
        _manifest(run_dir, stage)
        _assert_two_ranks_trained(run_dir / stage)
        ds_config = _deepspeed_config(run_dir / stage)
        assert ds_config["zero_optimization"]["stage"] == 3
    _assert_one_writer(run_dir, {"data/sft", "data/dpo", "sft", "dpo"})

    from safetensors.torch import load_file
    from transformers import AutoConfig

    weights = load_file(run_dir / "dpo" / "model.safetensors")
    config = AutoConfig.from_pretrained(run_dir / "dpo")
    assert weights["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert all(t.numel() > 0 for t in weights.values()), "ZeRO-3 placeholders saved instead of weights"


@pytest.mark.slow
@pytest.mark.extended
def test_deepspeed_zero3_offload_sft_on_two_processes(tmp_path, one_process_sft):
    """Parameters and optimizer states offloaded to host RAM (DeepSpeedCPUAdam steps there); the
    first run on a machine compiles DeepSpeed's cpu_adam op (about a minute, cached)."""
    run_dir = tmp_path / "run"
    launch("zero3_offload", "sft", run_dir, "logger=none")
    _assert_same_weights(one_process_sft, run_dir / "sft")  # measured 1.1e-6
    _assert_two_ranks_trained(run_dir / "sft")
    _assert_one_writer(run_dir, {"data/sft", "sft"})
    zero = _deepspeed_config(run_dir / "sft")["zero_optimization"]
    assert (zero["stage"], zero["offload_optimizer"]["device"], zero["offload_param"]["device"]) == (3, "cpu", "cpu")


def _assert_reference_is_the_start_policy(manifest: dict) -> None:
    """DPO's reference under ZeRO-3 (the frozen copy for full DPO, the policy with its adapter
    disabled for LoRA) must score like the policy it started as: a zero reward margin at the first
    step (learning rate 0 in warmup; with the default sigmoid+SFT loss the loss itself is not log 2).
    A reference left sharded, or the adapter left on, shows up as a non-zero first margin, a crash,
    or margins that stay exactly 0 once the policy moves."""
    history = manifest["log_history"]
    assert [h["step"] for h in history] == [1, 2, 3], "needs dpo.trainer.logging_steps=1"
    assert history[0]["rewards/margins"] == 0.0, history[0]
    assert history[-1]["rewards/margins"] != 0.0, "policy moved but reference scores follow it"


def _deepspeed_config(stage_dir: Path) -> dict:
    """The DeepSpeed config recorded in the stage's last DeepSpeed checkpoint."""
    import torch

    states = sorted((stage_dir / "checkpoint-3").glob("global_step*/*optim_states.pt"))
    assert states, f"no DeepSpeed checkpoint in {stage_dir / 'checkpoint-3'}"
    return torch.load(states[0], map_location="cpu", weights_only=False)["ds_config"]


# LoRA under ZeRO-3 with gradient checkpointing in both stages (PEFT + ZeRO-3 + checkpointing is a
# known crash with the wrong reentrancy; transformers 5.24 defaults to use_reentrant=False, and
# use_reentrant=true trains to the same adapter). 6 SFT steps with a checkpoint at 3, for resume.
LORA_ZERO3 = [
    "peft=lora",
    "sft.trainer.activation_checkpointing=true",
    "dpo.trainer.activation_checkpointing=true",
    "sft.data.limit=64",
    "dpo.data.limit=32",
    "sft.trainer.logging_steps=1",
    "dpo.trainer.logging_steps=1",
    "sft.trainer.max_steps=6",  # after SMALL's 3: the last value wins
    "sft.trainer.save_steps=3",
    "logger=none",
]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def zero3_lora_pipeline(tmp_path_factory):
    """`mistral-tune pipeline launcher=zero3 launcher.num_processes=2`: SFT and DPO each under
    `accelerate launch` with ZeRO-3, then merge and eval in this process."""
    run_dir = tmp_path_factory.mktemp("zero3_lora")
    port = ["launcher.extra_args=[--main_process_port,%d]" % _free_port()]
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "pipeline", f"run_dir={run_dir}", "launcher=zero3",
                           "launcher.num_processes=2", *port, *SMALL, *LORA_ZERO3, "eval.max_samples=4"],
                          cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.extended
def test_pipeline_under_zero3_lora_with_checkpointing(zero3_lora_pipeline):
    run_dir = zero3_lora_pipeline
    import torch
    from safetensors.torch import load_file

    _assert_one_writer(run_dir, {"data/sft", "data/dpo", "sft", "dpo", "merged", "eval"})
    for stage, steps in (("sft", 6), ("dpo", 3)):
        manifest = _manifest(run_dir, stage)
        assert (manifest["method"], manifest["metrics"]["global_step"]) == ("lora", steps)
        _assert_two_ranks_trained(run_dir / stage)
        assert _deepspeed_config(run_dir / stage)["zero_optimization"]["stage"] == 3
        args = torch.load(run_dir / stage / "training_args.bin", weights_only=False)
        assert args.activation_checkpointing
        # Adapters gathered out of ZeRO-3: real shapes (r=16), not the empty placeholders of a shard.
        adapter = load_file(run_dir / stage / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 and 16 in t.shape for t in adapter.values())
        assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 0, "adapter never trained"
    _assert_reference_is_the_start_policy(_manifest(run_dir, "dpo"))
    assert _manifest(run_dir, "merged")["from"] == "dpo"
    _manifest(run_dir, "eval")


@pytest.mark.slow
@pytest.mark.extended
def test_merge_of_zero3_lora_output_matches_the_adapter_model(zero3_lora_pipeline):
    """Merged checkpoint loads on its own, and its logits match base + SFT adapter (merged) + DPO
    adapter (live), rebuilt here independently of the merge stage's own check."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = zero3_lora_pipeline
    assert _manifest(run_dir, "merged")["probe_max_abs_diff"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "base")
    policy = PeftModel.from_pretrained(policy, run_dir / "sft").merge_and_unload()
    policy = PeftModel.from_pretrained(policy, run_dir / "dpo").eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - policy(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4, f"merged vs adapter model: max |dlogit| {diff:.3g}"


@pytest.mark.slow
@pytest.mark.extended
def test_resume_zero3_lora_after_a_kill_reaches_the_uninterrupted_adapter(tmp_path, zero3_lora_pipeline):
    """Kill a ZeRO-3 + LoRA SFT run (every process, SIGKILL) once checkpoint-3 is written, re-run
    the same command: it resumes from checkpoint-3 and ends on the adapter of the uninterrupted
    pipeline run (same config, 6 steps) within 1e-6 (measured: exactly equal on CPU)."""
    import time

    import psutil
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    overrides = [*LORA_ZERO3, "launcher=none"]
    first = subprocess.Popen(_launch_cmd("zero3", "sft", run_dir, *overrides), cwd=REPO, env=_clean_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "sft" / "checkpoint-3" / "trainer_state.json"  # written last in a checkpoint
    deadline = time.monotonic() + 300
    while first.poll() is None and not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # torchrun's workers are not in the launcher's process group: kill the whole tree by pid.
    tree = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    assert checkpoint.exists(), "the run ended before writing checkpoint-3"
    assert not (run_dir / "sft" / "manifest.json").exists(), "the run finished before the kill: nothing to resume"

    proc = launch("zero3", "sft", run_dir, *overrides)
    assert f"resuming from {run_dir / 'sft' / 'checkpoint-3'}" in proc.stdout
    assert _manifest(run_dir, "sft")["metrics"]["global_step"] == 6
    resumed = load_file(run_dir / "sft" / "adapter_model.safetensors")
    straight = load_file(zero3_lora_pipeline / "sft" / "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    diff = max((resumed[k] - straight[k]).abs().max().item() for k in resumed)
    assert diff <= 1e-6, f"resumed vs uninterrupted adapter: max |difference| {diff:.3g}"


@pytest.mark.slow
@pytest.mark.extended
def test_fsdp2_launch_on_cpu_fails_loudly(tmp_path):
    """On CPU accelerate 1.15 turns an FSDP launch into plain DDP (MULTI_CPU); the run must stop with
    that reason instead of training something else. FSDP2 itself is a GPU check."""
    cmd = _launch_cmd("fsdp2", "sft", tmp_path / "run", "logger=none", "sft.data.limit=64", "dpo.data.limit=32")
    proc = subprocess.run(cmd, cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "FSDP launch config needs GPUs" in proc.stdout
    assert not (tmp_path / "run" / "sft" / "checkpoint-3").exists()


def test_slurm_script_starts_one_command_per_node_with_its_machine_rank(tmp_path):
    """launch/slurm.sbatch under fake srun/scontrol: the command each node would run (a real
    SLURM runs it in tests/test_slurm.py)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\nif [ \"$2\" = node ]; then echo 'NodeName=node-a Arch=x86_64'; echo '   NodeAddr=10.0.0.7 NodeHostName=node-a';"
        " else printf 'node-a\\nnode-b\\n'; fi\n")
    # srun runs its command once per node, as SLURM would, with that node's SLURM_NODEID.
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nfor n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    (bin_dir / "mistral-tune").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "MISTRAL_TUNE": "mistral-tune",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_GPUS_PER_NODE": "h100:8", "STAGE": "dpo", "TIMEOUT_S": "300"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "run_dir=/shared/r x",
                           "experiment=zephyr_7b_beta_full"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert call == ("dpo run_dir=/shared/r x experiment=zephyr_7b_beta_full launcher=zero3 launcher.num_machines=2 "
                        f"launcher.num_processes=16 launcher.machine_rank={rank} launcher.main_process_ip=10.0.0.7 "
                        "launcher.main_process_port=29500 launcher.timeout_s=300")
    # A job without GPUs (sbatch --gpus-per-node=0): one process per node.
    (tmp_path / "calls").unlink()
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch")], env={**env, "SLURM_GPUS_PER_NODE": "0"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "launcher.num_processes=2 " in (tmp_path / "calls").read_text()


@pytest.mark.slow
@pytest.mark.extended
def test_every_training_command_honours_the_launcher(tmp_path):
    """`mistral-tune sft launcher=ddp launcher.num_processes=2` re-launches itself under accelerate
    (not only `pipeline`): 2 ranks train, metrics.json says so, and the ranks' output streams
    through the parent."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "sft", f"run_dir={run_dir}", "launcher=ddp",
                           "launcher.num_processes=2", "logger=none", "sft.data.limit=64", *SMALL],
                          cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate.commands.launch" in proc.stderr and "sft: 3 steps" in proc.stdout
    assert _manifest(run_dir, "sft")["metrics"]["world_size"] == 2
    _assert_two_ranks_trained(run_dir / "sft")
    _assert_one_writer(run_dir, {"data/sft", "sft"})
