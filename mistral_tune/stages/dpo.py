"""The `dpo` stage: preference tuning with TRL's DPOTrainer, starting from run_dir/sft.

The policy starts as the SFT model (its adapter, if any, merged in full precision). With LoRA or
QLoRA a fresh adapter trains and the reference is the same model with the adapter disabled (no
second model in memory); with full training the reference is a frozen copy of the SFT model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.stages import data
from mistral_tune import runs
from mistral_tune.errors import UserError
from mistral_tune.training.modeling import load_model, load_policy, lora_config, model_ref_after, resolve_peft
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.training.trainers import build_dpo_trainer, dpo_reference, loss_history, train_and_save

log = logging.getLogger("mistral_tune")


def _initial_policy(cfg: DictConfig, sft_ref: dict, method: str, out: Path):
    """The SFT policy as a full model; for QLoRA it is saved once and reloaded in 4-bit."""
    if method != "qlora":
        return load_policy(cfg, sft_ref)
    if not sft_ref["adapters"]:
        return load_model(sft_ref["base"], cfg, quantize=True)
    merged = out / "sft_policy"
    if runs.is_main_process() and not (merged / "config.json").exists():
        import torch

        load_policy(cfg, sft_ref, dtype=torch.bfloat16).save_pretrained(merged, safe_serialization=True)
    runs.wait_for_everyone()
    return load_model(str(merged), cfg, quantize=True)


def run(cfg: DictConfig) -> Path:
    from datasets import load_from_disk

    out = runs.stage_dir(cfg, "dpo")
    sft_manifest = runs.require_manifest(cfg, "sft", "dpo")
    data.run(cfg)
    data_manifest = runs.require_manifest(cfg, "data", "dpo")
    if "dpo" not in data_manifest["report"]:
        raise UserError("dpo needs preference rows: dpo.data.files and dpo.data.sources are empty", hint="or set dpo.enabled=false")
    inputs = {"data": data_manifest["fingerprint"], "sft": sft_manifest["fingerprint"]}
    if runs.check_done(cfg, "dpo", inputs):
        return out
    runs.write_stage_config(cfg, "dpo")

    tokenizer = load_tokenizer(Path(cfg.run_dir) / "tokenizer")
    method = resolve_peft(cfg)
    model = _initial_policy(cfg, sft_manifest["model"], method, out)
    ref_model, ref_kind = dpo_reference(cfg, method, lambda: load_policy(cfg, sft_manifest["model"]))
    log.info("dpo: reference = %s", ref_kind)
    train_dataset = load_from_disk(str(Path(cfg.run_dir) / "data" / "dpo"))

    trainer, metrics = train_and_save(cfg, "dpo", out, lambda report_to: build_dpo_trainer(
        cfg, model, ref_model, tokenizer, train_dataset, out, report_to,
        peft_config=lora_config(cfg) if method != "none" else None,
    ), {"method": method, "pairs": len(train_dataset), "reference": ref_kind})
    model_ref = model_ref_after(out, method, sft_manifest["model"])
    runs.finish_stage(cfg, "dpo", {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    if runs.is_main_process():
        shutil.rmtree(out / "sft_policy", ignore_errors=True)  # QLoRA scratch copy; merge rebuilds
    runs.wait_for_everyone()
    return out
