"""Weights & Biases: one group per run_dir, one run per stage, always finished."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from mistral_tune.config import to_container
from mistral_tune.runs import is_main_process

log = logging.getLogger("mistral_tune")
_said_offline = False


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str:
    """online | offline | disabled. `auto` goes offline without credentials or network."""
    global _said_offline
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if _has_credentials() and _reachable():
        return "online"
    if not _said_offline:
        log.info("W&B: no credentials or no network, logging offline (sync later with `wandb sync`)")
        _said_offline = True
    return "offline"


def group_name(run_dir: str) -> str:
    path = Path(run_dir).resolve()
    return f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


@contextlib.contextmanager
def tracked(cfg: DictConfig, stage: str) -> Iterator[list[str]]:
    """Start the stage's W&B run on rank 0 (config = the resolved Hydra config) and yield the
    `report_to` list for TRL. The run is finished whatever happens, with a failing exit code when
    the stage raised, so no run is left 'running' forever."""
    if cfg.logger.name == "none":
        yield []
        return
    if cfg.logger.name != "wandb":
        from mistral_tune.errors import UserError

        raise UserError(f"logger.name={cfg.logger.name!r} is not one of wandb, none")
    if not is_main_process():
        yield ["wandb"]  # transformers' WandbCallback logs from rank 0 only
        return
    import wandb

    wandb_dir = Path(cfg.run_dir)  # wandb writes into <dir>/wandb
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_LOG_MODEL"] = "false"  # checkpoints stay on disk, not in W&B artifacts
    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or group_name(cfg.run_dir),  # a sweep sets one group for its jobs
        name=stage,
        job_type=stage,
        tags=list(cfg.logger.tags),
        dir=str(wandb_dir),
        mode=resolve_mode(cfg.logger.mode),
        config=to_container(cfg),
        reinit="finish_previous",
    )
    try:
        yield ["wandb"]
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
