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
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.config import REPO_ROOT
from mistral_tune.errors import UserError

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
    cmd += ["--num_processes", str(cfg.launcher.num_processes), *cfg.launcher.extra_args]
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("run_dir=", "launcher"))]
    return cmd + ["-m", "mistral_tune", stage, *kept, f"run_dir={Path(cfg.run_dir).resolve()}", "launcher=none"]


def run_launched(cfg: DictConfig, stage: str, overrides: list[str]) -> None:
    """Run `stage` under the launcher, printing its output line by line as it arrives."""
    cmd = launch_command(cfg, stage, overrides)
    log.info("%s: %s", stage, " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=15)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip("\n"))
    if proc.returncode != 0:
        raise UserError(f"{stage} under launcher={cfg.launcher.name} exited with status {proc.returncode}:\n"
                        + "\n".join(tail))


def train(cfg: DictConfig, stage: str, overrides: list[str]) -> None:
    """Run training stage `stage` (its module mistral_tune/stages/<stage>.py): under the launcher
    when one is set, else in this process."""
    if cfg.launcher.name != "none":
        run_launched(cfg, stage, overrides)
    else:
        importlib.import_module(f"mistral_tune.stages.{stage}").run(cfg)
