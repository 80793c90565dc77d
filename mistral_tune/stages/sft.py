"""The `sft` stage: supervised fine-tuning with TRL's SFTTrainer, full, LoRA or QLoRA.

Reads run_dir/data/sft (the CLI builds it first), starts from the base model (or from the stage
before it in `stages=[...]`), writes run_dir/sft: the trained model or adapter, the tokenizer,
config.yaml, metrics.json, and manifest.json last.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.training.stage import train_stage
from mistral_tune.training.trainers import build_sft_trainer


def run(cfg: DictConfig) -> Path:
    return train_stage(cfg, "sft", partial(build_sft_trainer, cfg), lambda rows: {})
