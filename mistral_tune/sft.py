"""The `sft` stage: supervised fine-tuning with TRL's SFTTrainer, full, LoRA or QLoRA.

Reads run_dir/data/sft (built by the data stage if missing), writes run_dir/sft: the trained
model or adapter, the tokenizer, config.yaml, metrics.json, and manifest.json last.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import data, runs, tracking
from mistral_tune.lean import lean_sft_trainer
from mistral_tune.modeling import ensure_base, load_model, lora_config, model_ref_after, resolve_peft
from mistral_tune.tokenizer import load_tokenizer
from mistral_tune.training import last_checkpoint, loss_history, trl_args, write_metrics

log = logging.getLogger("mistral_tune")


def run(cfg: DictConfig) -> Path:
    from datasets import load_from_disk
    from trl import SFTConfig

    out = runs.stage_dir(cfg, "sft")
    data.run(cfg)
    data_manifest = runs.require_manifest(cfg, "data", "sft")
    if "sft" not in data_manifest["report"]:
        from mistral_tune.errors import UserError

        raise UserError("sft needs training rows: sft.data.files and sft.data.sources are empty")
    inputs = {"data": data_manifest["fingerprint"], "base": cfg.model.name_or_path}
    if runs.check_done(cfg, "sft", inputs):
        return out
    runs.write_stage_config(cfg, "sft")

    tokenizer = load_tokenizer(Path(cfg.run_dir) / "tokenizer")
    method = resolve_peft(cfg)
    base = ensure_base(cfg, tokenizer)
    model = load_model(base, cfg, quantize=method == "qlora")
    train_dataset = load_from_disk(str(Path(cfg.run_dir) / "data" / "sft"))

    with tracking.tracked(cfg, "sft") as report_to:
        start = time.perf_counter()
        trainer = lean_sft_trainer()(
            model=model,
            args=trl_args(cfg, "sft", SFTConfig, out, report_to),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=lora_config(cfg) if method != "none" else None,
        )
        result = trainer.train(resume_from_checkpoint=last_checkpoint(out))
        runtime = time.perf_counter() - start
        trainer.save_model(str(out))  # the adapter (LoRA/QLoRA) or the full model, with the tokenizer
    metrics = write_metrics(out, trainer, result, runtime, {"method": method})
    log.info("sft: %d steps, train loss %.4f, %.0f tokens/s", result.global_step,
             metrics["train_loss"] or float("nan"), metrics["tokens_per_second"] or 0)
    model_ref = model_ref_after(out, method, {"base": base, "adapters": []})
    runs.finish_stage(cfg, "sft", {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    runs.wait_for_everyone()
    return out
