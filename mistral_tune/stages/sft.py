"""The `sft` stage: supervised fine-tuning with TRL's SFTTrainer, full, LoRA or QLoRA.

Reads run_dir/data/sft (the CLI builds it first), starts from the base model (or from the stage
before it in `stages=[...]`), writes run_dir/sft: the trained model or adapter, the tokenizer,
config.yaml, metrics.json, and manifest.json last.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.training.modeling import drop_start_copy, load_start, lora_config, model_ref_after, resolve_peft, start_model
from mistral_tune.training.trainers import build_sft_trainer, loss_history, train_and_save

log = logging.getLogger("mistral_tune")


def run(cfg: DictConfig) -> Path:
    from datasets import load_from_disk

    run_dir = RunDir.of(cfg)
    out = run_dir.stage("sft")
    data_manifest = runs.require_manifest(cfg, runs.data_stage("sft"), "sft")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    start, previous = start_model(cfg, "sft", tokenizer)
    inputs = {"data": data_manifest["fingerprint"], "start": previous["fingerprint"] if previous else start}
    if runs.check_done(cfg, "sft", inputs):
        return out
    runs.begin_training(cfg, "sft", inputs)

    method = resolve_peft(cfg)
    model = load_start(cfg, start, method, out)
    train_dataset = load_from_disk(str(run_dir.dataset("sft")))

    trainer, metrics = train_and_save(cfg, "sft", out, lambda report_to: build_sft_trainer(
        cfg, model, tokenizer, train_dataset, out, report_to,
        peft_config=lora_config(cfg, "sft") if method != "none" else None,
    ), {"method": method})
    model_ref = model_ref_after(out, method, start)
    runs.finish_stage(cfg, "sft", {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    drop_start_copy(out)
    runs.wait_for_everyone()
    return out
