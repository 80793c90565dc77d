"""The one body of every training stage (sft, dpo, orpo, kto): find the data and the start model
in the run_dir, skip a finished stage, train with the stage's TRL trainer, write the manifest.

Each stage module keeps its own `run(cfg)` and docstring (what it trains and from what) and hands
this function its trainer builder; what differs between stages is only that builder, whether the
stage needs a reference model (DPO, KTO), and the extra figures its metrics.json records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.training.modeling import drop_start_copy, load_policy, load_start, lora_config, model_ref_after, resolve_peft, start_model
from mistral_tune.training.trainers import dpo_reference, loss_history, train_and_save

log = logging.getLogger("mistral_tune")


def train_stage(cfg: DictConfig, stage: str, build: Callable, info: Callable[[object], dict],
                reference: bool = False) -> Path:
    """Run training stage `stage` into run_dir/<stage> and return that folder.

    build(model=, tokenizer=, train_dataset=, out=, report_to=, peft_config=, [ref_model=]), all
    by keyword (`functools.partial(build_dpo_trainer, cfg)`), makes the trainer (ref_model only with
    reference=True); info(train_dataset) gives the stage's own metrics beside "method" (and
    "reference": the kind of reference model)."""
    from datasets import load_from_disk

    run_dir = RunDir.of(cfg)
    out = run_dir.stage(stage)
    data_manifest = runs.require_manifest(cfg, runs.data_stage(stage), stage)
    tokenizer = load_tokenizer(run_dir.tokenizer)
    start, previous = start_model(cfg, stage, tokenizer)
    inputs = {"data": data_manifest["fingerprint"], "start": previous["fingerprint"] if previous else start}
    if runs.check_done(cfg, stage, inputs):
        return out
    runs.begin_training(cfg, stage, inputs)

    method = resolve_peft(cfg)
    model = load_start(cfg, start, method, out)
    extra, metrics_info = {}, {"method": method}
    if reference:
        extra["ref_model"], ref_kind = dpo_reference(cfg, method, lambda: load_policy(cfg, start), stage=stage)
        log.info("%s: reference = %s", stage, ref_kind)
    train_dataset = load_from_disk(str(run_dir.dataset(stage)))
    metrics_info.update(info(train_dataset))
    if reference:
        metrics_info["reference"] = ref_kind

    trainer, metrics = train_and_save(cfg, stage, out, lambda report_to: build(
        model=model, tokenizer=tokenizer, train_dataset=train_dataset, out=out, report_to=report_to,
        peft_config=lora_config(cfg, stage) if method != "none" else None, **extra,
    ), metrics_info)
    model_ref = model_ref_after(out, method, start)
    runs.finish_stage(cfg, stage, {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    drop_start_copy(out)
    runs.wait_for_everyone()
    return out
