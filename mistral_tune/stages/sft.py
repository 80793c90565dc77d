"""The `sft` stage: supervised fine-tuning with TRL's SFTTrainer, full, LoRA or QLoRA.

Reads run_dir/data/sft (built by the data stage if missing), writes run_dir/sft: the trained
model or adapter, the tokenizer, config.yaml, metrics.json, and manifest.json last.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.stages import data
from mistral_tune import runs
from mistral_tune.training.modeling import ensure_base, load_model, lora_config, model_ref_after, resolve_peft
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.training.trainers import build_sft_trainer, loss_history, train_and_save

log = logging.getLogger("mistral_tune")


def run(cfg: DictConfig) -> Path:
    from datasets import load_from_disk

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

    trainer, metrics = train_and_save(cfg, "sft", out, lambda report_to: build_sft_trainer(
        cfg, model, tokenizer, train_dataset, out, report_to,
        peft_config=lora_config(cfg) if method != "none" else None,
    ), {"method": method})
    model_ref = model_ref_after(out, method, {"base": base, "adapters": []})
    runs.finish_stage(cfg, "sft", {"model": model_ref, "method": method, "metrics": metrics,
                                   "log_history": loss_history(trainer)}, inputs)
    runs.wait_for_everyone()
    return out
