"""What the SFT and DPO stages share: TRL arguments from the config, resume, metrics."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from mistral_tune import runs
from mistral_tune.config import trainer_kwargs
from mistral_tune.errors import UserError
from mistral_tune.training.modeling import resolve_dtype

log = logging.getLogger("mistral_tune")


# DPO options that TRL 1.16 reads only for some loss types: anything else would be accepted and
# silently ignored (label smoothing passed through but unused has bitten users before).
LOSS_TYPE_OPTIONS = {"label_smoothing": ({"robust", "exo_pair", "aot", "aot_unpaired"}, 0.0)}


def check_ignored_options(stage: str, kwargs: dict) -> None:
    if stage == "dpo" and kwargs.get("precompute_ref_log_probs") and kwargs.get("ld_alpha") is not None:
        raise UserError(
            "dpo.trainer.ld_alpha with precompute_ref_log_probs=true: TRL 1.16's cache key ignores ld_alpha, "
            "so a re-run with another value would reuse stale reference log-probs",
            hint="set dpo.trainer.precompute_ref_log_probs=false",
        )
    loss_types = kwargs.get("loss_type") or ["sigmoid"]
    loss_types = {loss_types} if isinstance(loss_types, str) else set(loss_types)
    for option, (used_by, default) in LOSS_TYPE_OPTIONS.items():
        if stage == "dpo" and kwargs.get(option, default) != default and not loss_types & used_by:
            raise UserError(
                f"dpo.trainer.{option}={kwargs[option]} has no effect with loss_type={sorted(loss_types)}: "
                f"TRL uses it only for {', '.join(sorted(used_by))}",
                hint="for Robust DPO (label-flip noise) set dpo.trainer.loss_type=[robust]",
            )


def trl_args(cfg: DictConfig, stage: str, config_cls, out: Path, report_to: list[str]):
    """Build TRL's SFTConfig/DPOConfig from `<stage>.trainer.*`, filling what mistral_tune owns."""
    kwargs = trainer_kwargs(cfg[stage].trainer)
    check_ignored_options(stage, kwargs)
    data_max = cfg[stage].data.max_length
    if "max_length" in kwargs and kwargs["max_length"] != data_max:
        raise UserError(
            f"{stage}.trainer.max_length={kwargs['max_length']} differs from {stage}.data.max_length={data_max}",
            hint=f"set {stage}.data.max_length only: rows longer than it are dropped and counted at build time",
        )
    kwargs["max_length"] = data_max
    if kwargs.get("padding_free") and not kwargs.get("packing"):
        # TRL refuses max_length with unpacked padding-free batches; the data stage has already
        # dropped (and counted) every row longer than data.max_length, so nothing is lost.
        kwargs["max_length"] = None
    kwargs.setdefault("seed", cfg.seed)
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")  # for tokens/s in metrics.json
    dtype = resolve_dtype(cfg)
    kwargs.setdefault("bf16", dtype == torch.bfloat16)
    kwargs.setdefault("fp16", dtype == torch.float16)
    if not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            # accelerate 1.15 makes FSDP only out of a GPU process group (state.py: the FSDP branch is
            # for MULTI_GPU and kin); on CPU the ranks become MULTI_CPU and train as plain DDP, every
            # rank holding the whole model, while the launch looks like FSDP.
            raise UserError(
                "an FSDP launch config needs GPUs: on CPU accelerate silently trains it as plain DDP",
                hint="on CPU use launch/accelerate/ddp.yaml, zero2.yaml or zero3.yaml (DeepSpeed runs on CPU)",
            )
        kwargs.setdefault("use_cpu", True)
    kwargs.update(output_dir=str(out), report_to=report_to, run_name=stage)
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"{stage}.trainer: {str(err).splitlines()[0]}") from None


def _checkpoint_is_complete(path: Path) -> bool:
    """transformers writes trainer_state.json last in a checkpoint: a folder without a readable one
    was cut off mid-save (preemption, OOM, a full disk)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = list(path.glob("*.safetensors")) or list(path.glob("*.safetensors.index.json"))
    return "global_step" in state and (bool(weights) or (path / "pytorch_model.bin").exists() or
                                       any(path.glob("global_step*")))


def last_checkpoint(out: Path) -> str | None:
    """The newest complete checkpoint-N folder, for automatic resume; incomplete ones are reported
    by path and skipped, so resume falls back to the previous checkpoint."""
    if not out.is_dir():
        return None
    found = sorted(
        (p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for path in found:
        if _checkpoint_is_complete(path):
            log.info("resuming from %s", path)
            return str(path)
        log.warning("checkpoint %s is incomplete (cut off while saving?); falling back to an earlier one", path)
    return None


class NonFiniteLoss(UserError):
    pass


def check_finite_loss(trainer, loss: torch.Tensor) -> torch.Tensor:
    """Stop at the first NaN/Inf loss, naming the step. (transformers' logging_nan_inf_filter would
    log a made-up average instead and train on.) Nothing is saved after it, so the last good
    checkpoint stays the newest."""
    if not torch.isfinite(loss.detach()).all():
        good = last_checkpoint(Path(trainer.args.output_dir))
        raise NonFiniteLoss(
            f"loss became {loss.item()} at step {trainer.state.global_step + 1}; training stopped "
            f"(last good checkpoint: {good or 'none saved yet'})",
            hint="lower the learning rate or check the data; re-running resumes from that checkpoint",
        )
    return loss


def checkpoint_bytes(model) -> int:
    """What a checkpoint of this model will take: the saved weights (all of them for full training,
    the trainable ones for adapters) plus AdamW's two fp32 moments per trainable parameter."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = trainable if len(trainable) < sum(1 for _ in model.parameters()) else list(model.parameters())
    return sum(p.numel() * p.element_size() for p in saved) + sum(8 * p.numel() for p in trainable)


class DiskGuard(TrainerCallback):
    """Refuse a save that will not fit: a checkpoint cut off by a full disk is worse than none."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
            need = checkpoint_bytes(model)
            free = shutil.disk_usage(args.output_dir).free
            if free < 1.1 * need:
                raise UserError(
                    f"not enough disk for the checkpoint at step {state.global_step}: it needs about "
                    f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free under {args.output_dir}",
                    hint="free some space (or lower save_total_limit) and re-run: training resumes",
                )
        return control


def train_and_save(cfg: DictConfig, stage: str, out: Path, build_trainer, extra_metrics: dict | None = None):
    """Build the stage's trainer inside its W&B run, train (resuming from the newest complete
    checkpoint), save the model or adapter with its tokenizer, write metrics.json.
    `build_trainer(report_to)` returns the TRL trainer. Returns (trainer, metrics)."""
    from mistral_tune.training import tracking

    with tracking.tracked(cfg, stage) as report_to:
        start = time.perf_counter()
        trainer = build_trainer(report_to)
        result = trainer.train(resume_from_checkpoint=last_checkpoint(out))
        runtime = time.perf_counter() - start
        trainer.save_model(str(out))
    metrics = write_metrics(out, trainer, result, runtime, extra_metrics)
    log.info("%s: %d steps, train loss %.4f, %.0f tokens/s (%s attention)", stage, result.global_step,
             metrics["train_loss"] or float("nan"), metrics["tokens_per_second"] or 0, metrics["attn_implementation"])
    return trainer, metrics


def write_metrics(out: Path, trainer, train_output, runtime: float, extra: dict | None = None) -> dict:
    """run_dir/<stage>/metrics.json: train_runtime counts everything after the model and data were
    loaded (trainer set-up and reference log-probs included), tokens are non-pad input tokens."""
    tokens = int(trainer.state.num_input_tokens_seen)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = {
        "train_runtime": round(runtime, 3),
        "tokens": tokens,
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "train_loss": train_output.metrics.get("train_loss"),
        "global_step": train_output.global_step,
        "world_size": trainer.args.world_size,  # processes that trained (launcher.num_processes)
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
        **(extra or {}),
    }
    if torch.cuda.is_available():
        metrics["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if runs.is_main_process():
        runs.write_json(out / "metrics.json", metrics)
    return metrics


def loss_history(trainer) -> list[dict]:
    return [
        {k: v for k, v in entry.items() if k in ("step", "loss", "learning_rate", "rewards/accuracies", "rewards/margins")}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]


