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
from mistral_tune.training.lean import lean_trainer
from mistral_tune.training.modeling import load_model, load_policy, lora_config, model_ref_after, resolve_peft
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.training.trainers import loss_history, train_and_save, trl_args

log = logging.getLogger("mistral_tune")
PRETOKENIZED = {"prompt_ids", "chosen_ids", "rejected_ids"}


def _trainer_class():
    from trl import DPOTrainer
    from trl.trainer import dpo_trainer

    class PretokenizedDPOTrainer(lean_trainer(DPOTrainer, dpo_trainer)):
        """DPOTrainer with the lean LM head and the guards of mistral_tune.training.lean.lean_trainer.

        TRL 1.16's DPOTrainer re-tokenizes every dataset through the chat template, which cannot
        be exact to Mistral's reference (control strings in content, v3's system placement). Our
        data stage already built `prompt_ids`/`chosen_ids`/`rejected_ids` with mistral-common, so
        they are used as they are; any other dataset goes through TRL's own preparation."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if PRETOKENIZED <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


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
    from trl import DPOConfig

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
    ref_model = None
    # With precomputed reference log-probs TRL scores the initial policy once, before training, and
    # keeps no reference model in memory.
    if method == "none" and not cfg.dpo.trainer.get("precompute_ref_log_probs", False):
        ref_model = load_policy(cfg, sft_manifest["model"])  # frozen copy; TRL puts it in eval mode
    train_dataset = load_from_disk(str(Path(cfg.run_dir) / "data" / "dpo"))

    trainer, metrics = train_and_save(cfg, "dpo", out, lambda report_to: _trainer_class()(
        model=model,
        ref_model=ref_model,
        args=trl_args(cfg, "dpo", DPOConfig, out, report_to),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg) if method != "none" else None,
    ), {"method": method, "pairs": len(train_dataset)})
    model_ref = model_ref_after(out, method, sft_manifest["model"])
    runs.finish_stage(cfg, "dpo", {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    if runs.is_main_process():
        shutil.rmtree(out / "sft_policy", ignore_errors=True)  # QLoRA scratch copy; merge rebuilds
    runs.wait_for_everyone()
    return out
