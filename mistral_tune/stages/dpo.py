"""The `dpo` stage: preference tuning with TRL's DPOTrainer, starting from the stage before it in
`stages=[...]` (run_dir/sft by default) or from the base model when it comes first.

The policy starts as that model (its adapters, if any, merged in full precision). With LoRA or
QLoRA a fresh adapter trains and the reference is the same model with the adapter disabled (no
second model in memory); with full training the reference is a frozen copy of the start model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.training.lean import lean_trainer
from mistral_tune.training.modeling import load_policy, load_start, lora_config, model_ref_after, resolve_peft, start_model
from mistral_tune.training.trainers import loss_history, train_and_save, trl_args

log = logging.getLogger("mistral_tune")
PRETOKENIZED = {"prompt_ids", "chosen_ids", "rejected_ids"}


def _trainer_class():
    from trl import DPOTrainer
    from trl.trainer import dpo_trainer

    class PretokenizedDPOTrainer(lean_trainer(DPOTrainer, dpo_trainer)):
        """DPOTrainer with the lean LM head and the guards of mistral_tune.lean.lean_trainer.

        TRL 1.16's DPOTrainer re-tokenizes every dataset through the chat template, which cannot
        be exact to Mistral's reference (control strings in content, v3's system placement). Our
        data stage already built `prompt_ids`/`chosen_ids`/`rejected_ids` with mistral-common, so
        they are used as they are; any other dataset goes through TRL's own preparation."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if PRETOKENIZED <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def run(cfg: DictConfig) -> Path:
    from datasets import load_from_disk
    from trl import DPOConfig

    run_dir = RunDir.of(cfg)
    out = run_dir.stage("dpo")
    data_manifest = runs.require_manifest(cfg, runs.data_stage("dpo"), "dpo")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    start, previous = start_model(cfg, "dpo", tokenizer)
    inputs = {"data": data_manifest["fingerprint"], "start": previous["fingerprint"] if previous else start}
    if runs.check_done(cfg, "dpo", inputs):
        return out
    runs.write_stage_config(cfg, "dpo")

    method = resolve_peft(cfg)
    model = load_start(cfg, start, method, out)
    ref_model = None
    # With precomputed reference log-probs TRL scores the initial policy once, before training, and
    # keeps no reference model in memory.
    if method == "none" and not cfg.dpo.trainer.get("precompute_ref_log_probs", False):
        ref_model = load_policy(cfg, start)  # frozen copy; TRL puts it in eval mode
    train_dataset = load_from_disk(str(run_dir.dataset("dpo")))

    trainer, metrics = train_and_save(cfg, "dpo", out, lambda report_to: _trainer_class()(
        model=model,
        ref_model=ref_model,
        args=trl_args(cfg, "dpo", DPOConfig, out, report_to),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg) if method != "none" else None,
    ), {"method": method, "pairs": len(train_dataset)})
    model_ref = model_ref_after(out, method, start)
    runs.finish_stage(cfg, "dpo", {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    if runs.is_main_process():
        shutil.rmtree(out / "start_policy", ignore_errors=True)  # QLoRA scratch copy; merge rebuilds
    runs.wait_for_everyone()
    return out
