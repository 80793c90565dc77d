"""`launcher=<name>`: a training command re-launches itself under `accelerate launch`.

`mistral-tune sft launcher=ddp` (and every training stage of `pipeline`) runs
`accelerate launch --config_file launch/accelerate/<name>.yaml --num_processes N -m mistral_tune
<stage> ... launcher=none` and streams the processes' output as it comes. The children get
`launcher=none`, so they train instead of launching again, and the same absolute run_dir, so
every rank reads and writes one folder.
"""

from __future__ import annotations

import collections
import importlib
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.config import REPO_ROOT
from mistral_tune.errors import UserError
from mistral_tune.lock import job_of

log = logging.getLogger("mistral_tune")


def launch_command(cfg: DictConfig, stage: str, overrides: list[str]) -> list[str]:
    """`accelerate launch --config_file ... -m mistral_tune <stage> <overrides>`, with the same
    run_dir on every rank (an absolute path, never re-resolved per rank)."""
    config_file = cfg.launcher.config_file
    if config_file and not Path(config_file).is_absolute():
        config_file = str(REPO_ROOT / config_file)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", config_file]
    cmd += ["--num_processes", str(cfg.launcher.num_processes)]
    if cfg.launcher.num_machines > 1:
        # accelerate turns these into torchrun's --nnodes/--node_rank/--master_addr/--master_port
        # (nproc_per_node = num_processes / num_machines).
        cmd += ["--num_machines", str(cfg.launcher.num_machines), "--machine_rank", str(cfg.launcher.machine_rank),
                "--main_process_ip", str(cfg.launcher.main_process_ip)]
    if cfg.launcher.main_process_port:
        cmd += ["--main_process_port", str(cfg.launcher.main_process_port)]
    if cfg.launcher.num_machines > 1:
        # torchrun's static rendezvous waits 600 s for the other machines, whatever the launcher
        # says: a machine that never starts would hold the others that long, then a traceback.
        cmd += ["--rdzv_conf", f"timeout={max(1, math.ceil(cfg.launcher.timeout_s))}"]
    cmd += list(cfg.launcher.extra_args)
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("run_dir=", "launcher"))]
    # The ranks train (launcher=none) with the collective timeout of the launching command.
    return cmd + ["-m", "mistral_tune", stage, *kept, f"run_dir={Path(cfg.run_dir).resolve()}", "launcher=none",
                  f"launcher.timeout_s={cfg.launcher.timeout_s}"]


def check_machines(launcher: DictConfig) -> None:
    """The launcher.num_machines/machine_rank/main_process_ip keys agree with each other."""
    n, rank = launcher.num_machines, launcher.machine_rank
    if n < 1 or not 0 <= rank < n:
        raise UserError(f"launcher.machine_rank={rank} with launcher.num_machines={n}: ranks are 0..{n - 1}")
    if launcher.timeout_s <= 0:
        raise UserError(f"launcher.timeout_s={launcher.timeout_s}: give a number of seconds > 0")
    if n == 1:
        return
    if launcher.name == "none":
        raise UserError(f"launcher.num_machines={n} with launcher=none: nothing would be launched",
                        hint="pick a launcher: launcher=ddp (or zero3, ...) launcher.num_machines=2 ...")
    if not launcher.main_process_ip:
        raise UserError(f"launcher.num_machines={n} needs launcher.main_process_ip (machine rank 0's address)")
    if launcher.num_processes % n:
        raise UserError(f"launcher.num_processes={launcher.num_processes} (processes in all) is not a multiple of "
                        f"launcher.num_machines={n}", hint=f"e.g. launcher.num_processes={8 * n} for {n} machines of 8 GPUs")


def machine_rank(cfg: DictConfig) -> int:
    """This command's machine: 0 builds data, holds the lock and writes; others wait for it."""
    return int(cfg.launcher.machine_rank) if cfg.launcher.num_machines > 1 else 0


# torch's static rendezvous (TCPStore on machine rank 0) when the other machines never came
RENDEZVOUS_TIMEOUT = re.compile(r"Timed out after \d+ seconds waiting for clients\. (?P<n>\d+)/\d+ clients joined")

LOST = "lost rank"  # the line a surviving rank prints when another one is gone (training/peers.py)


def run_launched(cfg: DictConfig, stage: str, overrides: list[str]) -> None:
    """Run `stage` under the launcher, printing its output line by line as it arrives."""
    cmd = launch_command(cfg, stage, overrides)
    log.info("%s: %s", stage, " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=15)
    lost = joined = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip("\n"))
            if LOST in line and lost is None:
                lost = line.strip().split(": error: ", 1)[-1]  # without the rank's "mistral-tune sft: error:"
            if joined is None:
                joined = RENDEZVOUS_TIMEOUT.search(line)
    if proc.returncode != 0:
        where = f" (machine rank {cfg.launcher.machine_rank} of {cfg.launcher.num_machines})" if cfg.launcher.num_machines > 1 else ""
        if lost:  # torch's traceback dump would bury it: the one line that says what happened comes first
            raise UserError(f"{stage}{where}: {lost}")
        if joined:
            raise UserError(
                f"{stage}{where}: only {joined['n']} of {cfg.launcher.num_machines} machines joined the rendezvous "
                f"{job_of(cfg.launcher)['rendezvous']} within launcher.timeout_s={cfg.launcher.timeout_s:g}s",
                hint="start the same command on every machine (launcher.machine_rank=1, ...) with the same "
                     "launcher.main_process_ip/main_process_port, and check that they can reach this address")
        raise UserError(f"{stage} under launcher={cfg.launcher.name}{where} exited with status {proc.returncode}:\n"
                        + "\n".join(tail))


def train(cfg: DictConfig, stage: str, overrides: list[str]) -> None:
    """Run training stage `stage` (its module mistral_tune/stages/<stage>.py): under the launcher
    when one is set, else in this process."""
    if cfg.launcher.name != "none":
        run_launched(cfg, stage, overrides)
    else:
        importlib.import_module(f"mistral_tune.stages.{stage}").run(cfg)
