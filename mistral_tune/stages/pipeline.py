"""The `pipeline` command: data -> each stage of `stages=[...]` -> merge -> eval (-> push when
push.repo_id is set). With pairs=onpolicy, the pairs stage samples DPO's pairs just before DPO.

Each stage reads the previous stage's manifest from run_dir; finished stages with the same config
are skipped, so re-running the command resumes where it stopped. With `launcher=<name>`, each
training stage runs under `accelerate launch` in its own processes (mistral_tune.launch).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.errors import UserError
from mistral_tune.launch import train
from mistral_tune.stages import data, evaluate, merge, pairs, push

log = logging.getLogger("mistral_tune")


def run(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    overrides = list(overrides or [])
    # pairs=onpolicy: DPO's pairs are sampled from the policy it starts from, so its dataset is
    # built after the stage before it, not up front.
    if cfg.pairs.name not in ("given", "onpolicy"):
        raise UserError(f"pairs.name={cfg.pairs.name!r} is not one of given, onpolicy")
    sampled = "dpo" if cfg.pairs.name == "onpolicy" and "dpo" in cfg.stages else None
    for stage in cfg.stages:  # every dataset first: a bad row fails in seconds, not after SFT
        if stage != sampled:
            data.ensure(cfg, stage)
    for stage in cfg.stages:
        if stage == sampled:
            pairs.run(cfg)
            data.ensure(cfg, stage)
        train(cfg, stage, overrides)
    out = merge.run(cfg)
    if cfg.eval.enabled:
        evaluate.run(cfg)  # before push, so the pushed model card carries the evaluation table
    if cfg.push.repo_id:
        push.run(cfg)
    if runs.is_main_process():
        log.info("pipeline: done; chat-ready model in %s", out)
    return out
