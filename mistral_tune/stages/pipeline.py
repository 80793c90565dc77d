"""The `pipeline` command: data -> each stage of `stages=[...]` -> merge -> eval (-> export when
export.enabled, -> push when push.repo_id is set). With pairs=onpolicy, the pairs stage samples DPO's pairs just before DPO;
with pairs.rounds=N, N rounds of pairs and DPO (stages/rounds.py), merge and eval taking the last.

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
from mistral_tune.launch import machine_rank, train
from mistral_tune.runs import RunDir
from mistral_tune.stages import data, evaluate, export, merge, pairs, push, rounds

log = logging.getLogger("mistral_tune")


def sampled_stage(cfg: DictConfig) -> str | None:
    """The stage whose data the `pairs` stage samples (pairs=onpolicy: DPO), else None."""
    if cfg.pairs.name not in ("given", "onpolicy"):
        raise UserError(f"pairs.name={cfg.pairs.name!r} is not one of given, onpolicy")
    return "dpo" if cfg.pairs.name == "onpolicy" and "dpo" in cfg.stages else None


def prepare(cfg: DictConfig, stage: str) -> None:
    """The data `stage` trains on, built unless already there; with pairs=onpolicy, DPO's pairs
    are first sampled from the policy it starts from (so after the stage before it)."""
    if stage == sampled_stage(cfg) and machine_rank(cfg) > 0:
        raise UserError("pairs=onpolicy on several machines is not supported yet: the pairs stage samples on "
                        "machine rank 0 alone", hint="give DPO fixed pairs (pairs=given), or run it on one machine")
    if stage == sampled_stage(cfg):
        # The pairs stage reads the chat format, which the first data build fixes: with
        # stages=[dpo] (or a later DPO round) no build has run before it. Rank 0 writes it.
        if runs.is_main_process():
            data.fix_chat_format(cfg, RunDir.of(cfg))
        runs.wait_for_everyone()
        pairs.run(cfg)
    data.ensure(cfg, stage)


def run(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    overrides = list(overrides or [])
    n_rounds = rounds.count(cfg)  # a bad pairs.rounds fails before any work
    machine = machine_rank(cfg)
    if machine > 0 and (sampled_stage(cfg) or n_rounds > 1):
        # The pairs stage samples in machine rank 0's process alone, between two launches; the
        # other machines would have to follow it step by step. Not built yet.
        raise UserError("pairs=onpolicy (and pairs.rounds) on several machines is not supported yet",
                        hint="run `mistral-tune pairs`-based pipelines on one machine, or give DPO fixed pairs (pairs=given)")
    if cfg.export.enabled:  # a bad export.quant (or a missing extra) too, not after training
        export.check_options(cfg)
    for stage in cfg.stages:  # every dataset first: a bad row fails in seconds, not after SFT
        if stage != sampled_stage(cfg):
            data.ensure(cfg, stage)
    for stage in cfg.stages:
        if stage == sampled_stage(cfg):
            prepare(cfg, stage)
        train(cfg, stage, overrides)
    if machine > 0:  # merge, eval and push are one process each, on machine rank 0
        log.info("pipeline: machine rank %d done; machine rank 0 merges and evaluates", machine)
        return RunDir.of(cfg).merged
    for r in range(2, n_rounds + 1):  # iterative DPO: each round samples from the last one's model
        rcfg = rounds.start(cfg, r)
        prepare(rcfg, "dpo")
        train(rcfg, "dpo", rounds.overrides(cfg, r, overrides))
    out = merge.run(cfg)
    if cfg.eval.enabled and not data.has_eval_data(cfg):
        log.warning("pipeline: eval skipped: no held-out data (your data is too small for an "
                    "eval.split_fraction split; give eval.files=[...] / eval.pref_files=[...])")
    elif cfg.eval.enabled:
        evaluate.run(cfg)  # before push, so the pushed model card carries the evaluation table
    if cfg.export.enabled:  # GGUF for llama.cpp / Ollama; the card then names the files
        export.run(cfg)
    if cfg.push.repo_id:
        push.run(cfg)
    if runs.is_main_process():
        log.info("pipeline: done; chat-ready model in %s", out)
    return out
