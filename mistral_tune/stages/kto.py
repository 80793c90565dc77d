"""The `kto` stage: Kahneman-Tversky optimisation (Ethayarajh et al., 2024) with TRL's KTOTrainer,
starting from the stage before it in `stages=[...]` (`stages=[sft,kto]`: run_dir/sft) or from the
base model when it comes first.

KTO learns from replies labelled desirable or undesirable, one at a time, with no need for pairs:
run_dir/data/kto holds them as unpaired examples (pairs are split into one of each, shuffled:
datasets/unpaired.py). The reference is chosen as DPO's is (training.trainers.dpo_reference): with
LoRA or QLoRA the start model with the adapter disabled, with full training a frozen copy of it.
Writes run_dir/kto: the model or adapter, config.yaml, metrics.json, and manifest.json last.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.training.modeling import drop_start_copy, load_policy, load_start, lora_config, model_ref_after, resolve_peft, start_model
from mistral_tune.training.trainers import build_kto_trainer, dpo_reference, loss_history, train_and_save

log = logging.getLogger("mistral_tune")


def run(cfg: DictConfig) -> Path:
    from datasets import load_from_disk

    run_dir = RunDir.of(cfg)
    out = run_dir.stage("kto")
    data_manifest = runs.require_manifest(cfg, runs.data_stage("kto"), "kto")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    start, previous = start_model(cfg, "kto", tokenizer)
    inputs = {"data": data_manifest["fingerprint"], "start": previous["fingerprint"] if previous else start}
    if runs.check_done(cfg, "kto", inputs):
        return out
    runs.begin_training(cfg, "kto", inputs)

    method = resolve_peft(cfg)
    model = load_start(cfg, start, method, out)
    ref_model, ref_kind = dpo_reference(cfg, method, lambda: load_policy(cfg, start), stage="kto")
    log.info("kto: reference = %s", ref_kind)
    train_dataset = load_from_disk(str(run_dir.dataset("kto")))

    trainer, metrics = train_and_save(cfg, "kto", out, lambda report_to: build_kto_trainer(
        cfg, model, ref_model, tokenizer, train_dataset, out, report_to,
        peft_config=lora_config(cfg, "kto") if method != "none" else None,
    ), {"method": method, "examples": len(train_dataset), "desirable": sum(train_dataset["label"]),
        "reference": ref_kind})
    model_ref = model_ref_after(out, method, start)
    runs.finish_stage(cfg, "kto", {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    drop_start_copy(out)
    runs.wait_for_everyone()
    return out
