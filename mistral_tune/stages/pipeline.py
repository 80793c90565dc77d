"""The `pipeline` command: data -> sft -> dpo -> merge -> eval (-> push when push.repo_id is set).

Each stage reads the previous stage's manifest from run_dir; finished stages with the same config
are skipped, so re-running the command resumes where it stopped. With `launcher=<name>`, each
training stage runs under `accelerate launch` in its own processes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.stages import data, dpo, evaluate, merge, push, sft
from mistral_tune import runs
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
    cmd = launch_command(cfg, stage, overrides)
    log.info("%s: %s", stage, " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise UserError(f"{stage} under launcher={cfg.launcher.name} exited with status {proc.returncode}:\n{tail}")


def run(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    overrides = list(overrides or [])
    launched = cfg.launcher.name != "none"
    data.run(cfg)
    for stage, module in (("sft", sft), ("dpo", dpo)):
        if stage == "dpo" and not (cfg.dpo.enabled and (cfg.dpo.data.files or cfg.dpo.data.sources)):
            log.info("dpo: skipped (%s)", "dpo.enabled=false" if not cfg.dpo.enabled else "no dpo data")
            continue
        if launched:
            run_launched(cfg, stage, overrides)
        else:
            module.run(cfg)
    out = merge.run(cfg)
    if cfg.eval.enabled:
        evaluate.run(cfg)  # before push, so the pushed model card carries the evaluation table
    if cfg.push.repo_id:
        push.run(cfg)
    if runs.is_main_process():
        log.info("pipeline: done; chat-ready model in %s", out)
    return out
