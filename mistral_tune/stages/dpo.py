"""The `dpo` stage: preference tuning with TRL's DPOTrainer, starting from the stage before it in
`stages=[...]` (run_dir/sft by default) or from the base model when it comes first.

The policy starts as that model (its adapters, if any, merged in full precision). With LoRA or
QLoRA a fresh adapter trains and the reference is the same model with the adapter disabled (no
second model in memory); with full training the reference is a frozen copy of the start model.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.training.stage import train_stage
from mistral_tune.training.trainers import build_dpo_trainer


def run(cfg: DictConfig) -> Path:
    return train_stage(cfg, "dpo", partial(build_dpo_trainer, cfg), lambda pairs: {"pairs": len(pairs)}, reference=True)
