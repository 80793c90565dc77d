"""The `orpo` stage: odds-ratio preference optimisation (Hong et al., 2024) with TRL's ORPOTrainer.

One stage from a base model to a preference-tuned one, with no reference model: the loss is the NLL
of the chosen reply plus beta x the log-odds-ratio term of chosen over rejected. Reads
run_dir/data/orpo (preference pairs, built by the CLI first), starts from the stage before it in
`stages=[...]` or from the base model (`stages=[orpo]`), writes run_dir/orpo: the model or
adapter, config.yaml, metrics.json, and manifest.json last. The anchor result: Mistral-ORPO-beta
(Mistral-7B + UltraFeedback) reached AlpacaEval 2.0 12.2% and MT-Bench 7.32.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.training.modeling import drop_start_copy, load_start, lora_config, model_ref_after, resolve_peft, start_model
from mistral_tune.training.trainers import build_orpo_trainer, loss_history, train_and_save

log = logging.getLogger("mistral_tune")


def run(cfg: DictConfig) -> Path:
    from datasets import load_from_disk

    run_dir = RunDir.of(cfg)
    out = run_dir.stage("orpo")
    data_manifest = runs.require_manifest(cfg, runs.data_stage("orpo"), "orpo")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    start, previous = start_model(cfg, "orpo", tokenizer)
    inputs = {"data": data_manifest["fingerprint"], "start": previous["fingerprint"] if previous else start}
    if runs.check_done(cfg, "orpo", inputs):
        return out
    runs.begin_training(cfg, "orpo", inputs)

    method = resolve_peft(cfg)
    model = load_start(cfg, start, method, out)
    train_dataset = load_from_disk(str(run_dir.dataset("orpo")))

    trainer, metrics = train_and_save(cfg, "orpo", out, lambda report_to: build_orpo_trainer(
        cfg, model, tokenizer, train_dataset, out, report_to,
        peft_config=lora_config(cfg, "orpo") if method != "none" else None,
    ), {"method": method, "pairs": len(train_dataset)})
    model_ref = model_ref_after(out, method, start)
    runs.finish_stage(cfg, "orpo", {"model": model_ref, "method": method, "metrics": metrics,
                                    "log_history": loss_history(trainer)}, inputs)
    drop_start_copy(out)
    runs.wait_for_everyone()
    return out
