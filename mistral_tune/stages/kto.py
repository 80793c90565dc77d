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

from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.training.stage import train_stage
from mistral_tune.training.trainers import build_kto_trainer


def run(cfg: DictConfig) -> Path:
    return train_stage(cfg, "kto", partial(build_kto_trainer, cfg),
                       lambda rows: {"examples": len(rows), "desirable": sum(rows["label"])}, reference=True)
