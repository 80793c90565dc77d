"""The `dpo` stage: preference tuning with TRL's DPOTrainer, starting from the stage before it in
`stages=[...]` (run_dir/sft by default) or from the base model when it comes first.

The policy starts as that model (its adapters, if any, merged in full precision). With LoRA or
QLoRA a fresh adapter trains and the reference is the same model with the adapter disabled (no
second model in memory); with full training the reference is a frozen copy of the start model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.training.modeling import drop_start_copy, load_policy, load_start, lora_config, model_ref_after, resolve_peft, start_model
from mistral_tune.training.trainers import build_dpo_trainer, dpo_reference, loss_history, train_and_save

log = logging.getLogger("mistral_tune")


def run(cfg: DictConfig) -> Path:
    from datasets import load_from_disk

    run_dir = RunDir.of(cfg)
    out = run_dir.stage("dpo")
    data_manifest = runs.require_manifest(cfg, runs.data_stage("dpo"), "dpo")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    start, previous = start_model(cfg, "dpo", tokenizer)
    inputs = {"data": data_manifest["fingerprint"], "start": previous["fingerprint"] if previous else start}
    if runs.check_done(cfg, "dpo", inputs):
        return out
    runs.begin_training(cfg, "dpo", inputs)

    method = resolve_peft(cfg)
    model = load_start(cfg, start, method, out)
    ref_model, ref_kind = dpo_reference(cfg, method, lambda: load_policy(cfg, start))
    log.info("dpo: reference = %s", ref_kind)
    train_dataset = load_from_disk(str(run_dir.dataset("dpo")))

    trainer, metrics = train_and_save(cfg, "dpo", out, lambda report_to: build_dpo_trainer(
        cfg, model, ref_model, tokenizer, train_dataset, out, report_to,
        peft_config=lora_config(cfg, "dpo") if method != "none" else None,
    ), {"method": method, "pairs": len(train_dataset), "reference": ref_kind})
    model_ref = model_ref_after(out, method, start)
    runs.finish_stage(cfg, "dpo", {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    drop_start_copy(out)
    runs.wait_for_everyone()
    return out
