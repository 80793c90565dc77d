"""The `orpo` stage: odds-ratio preference optimisation (Hong et al., 2024) with TRL's ORPOTrainer.

One stage from a base model to a preference-tuned one, with no reference model: the loss is the NLL
of the chosen reply plus beta x the log-odds-ratio term of chosen over rejected. Reads
run_dir/data/orpo (preference pairs, built by the CLI first), starts from the stage before it in
`stages=[...]` or from the base model (`stages=[orpo]`), writes run_dir/orpo: the model or
adapter, config.yaml, metrics.json, and manifest.json last. The anchor result: Mistral-ORPO-beta
(Mistral-7B + UltraFeedback) reached AlpacaEval 2.0 12.2% and MT-Bench 7.32.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.training.stage import train_stage
from mistral_tune.training.trainers import build_orpo_trainer


def run(cfg: DictConfig) -> Path:
    return train_stage(cfg, "orpo", partial(build_orpo_trainer, cfg), lambda pairs: {"pairs": len(pairs)})
