"""The one place that builds TRL trainers, and the one place that reaches into TRL's internals.

Stages and bench/run.py call `build_sft_trainer`, `build_dpo_trainer` (with `dpo_reference`),
`build_orpo_trainer` and `build_kto_trainer`; nothing else subclasses or patches a TRL trainer. Every
trainer built here stops at the first non-finite loss and refuses a checkpoint that will not fit on
disk; SFT, DPO and KTO also get the lean LM head of mistral_tune/training/lean.py where TRL's has no Triton kernel.
Also here: TRL arguments from the config (`trl_args`), resume, metrics.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from mistral_tune import runs
from mistral_tune.config import trainer_kwargs
from mistral_tune.errors import UserError
from mistral_tune.training.modeling import resolve_dtype

log = logging.getLogger("mistral_tune")


# ------------------------------------------------------------------------------------------------
# TRL_INTERNALS: every private TRL (and transformers) name mistral_tune patches, overrides or relies on (pinned TRL
# 1.16). tests/test_trl_internals.py checks each one's presence and parameters, so a TRL upgrade
# that renames, removes or re-signs one fails a test that names it, instead of silently switching
# a patch off. Nothing outside this section touches these names.


@dataclass(frozen=True)
class Internal:
    path: str  # module:attribute or module:Class.method
    params: tuple[str, ...]  # the parameters we call or override it with, in order
    why: str


TRL_INTERNALS = (
    Internal("trl.trainer.utils:add_fused_lm_head", ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
             "replaced by the lean LM head while SFT/DPO trainers are built (lean_heads); its keyword "
             "arguments are honoured by the lean head, any other is an error"),
    Internal("trl.trainer.sft_trainer:add_fused_lm_head", ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
             "SFTTrainer.__init__ calls it through this module global, so that is what lean_heads patches"),
    Internal("trl.trainer.dpo_trainer:add_fused_lm_head", ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
             "DPOTrainer.__init__ calls it through this module global (policy and reference)"),
    Internal("trl.trainer.kto_trainer:add_fused_lm_head", ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
             "KTOTrainer.__init__ calls it through this module global (policy and reference)"),
    Internal("trl.trainer.utils:_use_triton", ("device",),
             "where TRL's head has a Triton kernel it is already compact, and stays"),
    Internal("trl.trainer.utils:FusedCausalLMOutput",
             ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask", "aux_loss"),
             "what the lean head returns: the fields TRL's losses read"),
    Internal("trl.trainer.dpo_trainer:DPOTrainer._prepare_dataset",
             ("self", "dataset", "processing_class", "args", "dataset_name"),
             "overridden: pre-tokenized prompt_ids/chosen_ids/rejected_ids rows skip TRL's chat-template tokenization"),
    Internal("trl.trainer.kto_trainer:KTOTrainer._prepare_dataset",
             ("self", "dataset", "processing_class", "args", "dataset_name"),
             "overridden: pre-tokenized prompt_ids/completion_ids/label rows skip TRL's tokenization; the KL "
             "completions it would add (each row's completion moved to the next row of its batch) are added the same way"),
    Internal("trl.experimental.orpo.orpo_trainer:ORPOTrainer.tokenize_row", ("self", "feature", "model"),
             "overridden: ORPOTrainer.__init__ maps every row through it (after maybe_extract_prompt and "
             "maybe_apply_chat_template, which leave rows without prompt/chosen/rejected columns alone); "
             "pre-tokenized rows become its chosen_/rejected_/prompt_ columns without re-tokenizing"),
    Internal("trl.experimental.orpo.orpo_trainer:ORPOTrainer.concatenated_inputs",
             ("batch", "is_encoder_decoder", "padding_value", "device"),
             "reads the chosen_input_ids/attention_mask/labels and rejected_* columns tokenize_row must give"),
    # not TRL's but transformers': ORPO batches have no input_ids, so the Trainer counted no tokens
    Internal("transformers.trainer:Trainer._track_num_input_tokens", ("self", "inputs"),
             "overridden for ORPO: counts the chosen and rejected sequences' tokens (metrics.json tokens/s)"),
)

PRETOKENIZED_PAIRS = {"prompt_ids", "chosen_ids", "rejected_ids"}  # made by the data stage with mistral-common
PRETOKENIZED_UNPAIRED = {"prompt_ids", "completion_ids", "label"}  # KTO's, made by datasets/unpaired.py


def resolve_internal(path: str):
    """The object at "module:attr" or "module:Class.attr" (AttributeError/ImportError if gone)."""
    import importlib

    module, _, attr = path.partition(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_internal(internal: Internal) -> None:
    """Raise RuntimeError naming `internal` if the installed TRL no longer has it as pinned."""
    try:
        obj = resolve_internal(internal.path)
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"TRL internal {internal.path} is gone ({err}); mistral_tune uses it: {internal.why}") from None
    if isinstance(obj, type) and hasattr(obj, "__dataclass_fields__"):
        params = tuple(obj.__dataclass_fields__)
    else:
        params = tuple(inspect.signature(obj).parameters)
    if params != internal.params:
        raise RuntimeError(f"TRL internal {internal.path} changed: parameters {params}, pinned {internal.params}; "
                           f"mistral_tune uses it: {internal.why}")


# Attention kernels whose cost follows the sequences, not the packed row: a padding-free batch is
# cheaper than the padded one (SDPA gets a dense [N, N] mask for a packed row: only on CPU is that
# still the faster choice, where the lean head packs regardless).
PACKED_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")


@contextlib.contextmanager
def lean_heads(*trl_modules):
    """While a TRL trainer is constructed, make the `add_fused_lm_head` of `trl_modules` add the
    lean head instead where TRL's has no Triton kernel (and the model has no logit transform the
    lean head lacks). Patching at construction (not after) means the reference log-probs TRL
    precomputes inside __init__ use the lean head too. TRL's `temperature` and
    `cast_lm_head_to_fp32` are passed on; an argument the lean head does not know is an error."""
    from trl.trainer.utils import _use_triton

    from mistral_tune.training.lean import add_lean_lm_head, add_packing, lean_head_supports

    originals = {m: m.add_fused_lm_head for m in trl_modules}
    trl_head = originals[trl_modules[0]]

    def choose(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        if _use_triton(next(model.parameters()).device) or not lean_head_supports(model):
            trl_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)
            if getattr(model.config, "_attn_implementation", None) in PACKED_ATTENTION:
                add_packing(model)  # padded (DPO) batches run padding-free; SDPA would pay for the whole pack
            return
        add_lean_lm_head(model, outputs, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32)

    for m in trl_modules:
        m.add_fused_lm_head = choose
    try:
        yield
    finally:
        for m, original in originals.items():
            m.add_fused_lm_head = original


def guarded(trainer_cls, *trl_modules):
    """`trainer_cls` with a stop at the first non-finite loss, a free-disk check before each save,
    and (for each of `trl_modules` given) the lean LM head installed while it is constructed."""

    class Guarded(trainer_cls):
        def __init__(self, *args, **kwargs):
            with lean_heads(*trl_modules) if trl_modules else contextlib.nullcontext():
                super().__init__(*args, **kwargs)
            self.add_callback(DiskGuard())

        def training_step(self, *args, **kwargs):
            return check_finite_loss(self, super().training_step(*args, **kwargs))

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{trainer_cls.__name__}"
    return Guarded


def sft_trainer_class():
    """TRL's SFTTrainer, guarded, with the lean head. (Pre-tokenized `input_ids`/`assistant_masks`
    rows are TRL's own "already tokenized" path: nothing to override.)"""
    from trl import SFTTrainer
    from trl.trainer import sft_trainer

    return guarded(SFTTrainer, sft_trainer)


def dpo_trainer_class():
    """TRL's DPOTrainer, guarded, with the lean head, taking pre-tokenized rows as they are.

    TRL 1.16's DPOTrainer re-tokenizes every dataset through the chat template, which cannot be
    exact to Mistral's reference (control strings in content, v3's system placement). Our data
    stage already built `prompt_ids`/`chosen_ids`/`rejected_ids` with mistral-common, so they are
    used as they are; any other dataset goes through TRL's own preparation."""
    from trl import DPOTrainer
    from trl.trainer import dpo_trainer

    class PretokenizedDPOTrainer(guarded(DPOTrainer, dpo_trainer)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if PRETOKENIZED_PAIRS <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PretokenizedDPOTrainer


def orpo_trainer_class():
    """TRL's experimental ORPOTrainer, guarded, taking pre-tokenized rows as they are.

    ORPOTrainer tokenizes text rows inside __init__ (no _prepare_dataset to skip); `tokenize_row`
    is where a row becomes its columns, so pre-tokenized rows are turned into those columns there,
    never re-tokenized and never truncated (the data stage dropped and counted over-long rows).
    The loss is TRL's: the NLL of the chosen sequence over all its tokens, prompt included (as in
    ORPO's reference code), minus beta * mean log sigmoid(log odds ratio), the odds from the mean
    per-token log-prob of each completion. ORPOTrainer computes full logits (it has no fused head),
    so there is no lean head to install."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "You are importing from 'trl.experimental'"
        from trl.experimental.orpo import ORPOTrainer

    class PretokenizedORPOTrainer(guarded(ORPOTrainer)):
        def tokenize_row(self, feature, model=None):
            if not PRETOKENIZED_PAIRS <= set(feature):
                return super().tokenize_row(feature, model)
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                completion = list(feature[f"{side}_ids"])
                row[f"{side}_input_ids"] = prompt + completion
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(completion))
                row[f"{side}_labels"] = [-100] * len(prompt) + completion
            return row

        def _track_num_input_tokens(self, inputs):
            for side in ("chosen", "rejected"):
                if f"{side}_input_ids" in inputs:
                    super()._track_num_input_tokens({"input_ids": inputs[f"{side}_input_ids"],
                                                     "attention_mask": inputs[f"{side}_attention_mask"]})

    return PretokenizedORPOTrainer


def kto_trainer_class():
    """TRL's KTOTrainer, guarded, with the lean head, taking pre-tokenized unpaired rows as they are.

    The loss is TRL's (KTO paper, eq. 7): per example, 1 - sigmoid(beta * (r - z)) for a desirable
    completion and 1 - sigmoid(beta * (z - r)) for an undesirable one, each weighted by
    desirable_weight / undesirable_weight, averaged over the batch; r is the completion's summed
    log-prob under the policy minus under the reference, z the batch's KL estimate: the same
    difference on mismatched (prompt, completion) pairs, averaged, clamped at 0 and not
    differentiated. The mismatched pairs are built before training: each row's completion moved to
    the next row of its batch of per_device_train_batch_size, in the dataset's (sequential) order."""
    from trl import KTOTrainer
    from trl.trainer import kto_trainer

    class PretokenizedKTOTrainer(guarded(KTOTrainer, kto_trainer)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not PRETOKENIZED_UNPAIRED <= set(dataset.column_names):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not self.calculate_KL or "KL_completion_ids" in dataset.column_names:
                return dataset

            def add_kl_completion_ids(rows):  # as TRL's: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})
                return {"KL_completion_ids": [rows["completion_ids"][-1]] + rows["completion_ids"][:-1]}

            return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)

    return PretokenizedKTOTrainer


# ------------------------------------------------------------------------------------------------
# Builders: what the stages and bench/run.py call.


def build_sft_trainer(cfg: DictConfig, model, tokenizer, train_dataset, out: Path, report_to: list[str],
                      peft_config=None, callbacks=None):
    from trl import SFTConfig

    return sft_trainer_class()(model=model, args=trl_args(cfg, "sft", SFTConfig, out, report_to),
                               train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config,
                               callbacks=callbacks)


def dpo_reference(cfg: DictConfig, method: str, load_frozen_copy, stage: str = "dpo") -> tuple[object | None, str]:
    """The DPO (or KTO: stage="kto") reference, one choice for those stages and bench/run.py: (ref_model, kind).

    - "precomputed": `precompute_ref_log_probs=true`; TRL scores the initial policy once, before
      training (adapter disabled for a fresh LoRA adapter), and keeps no reference model in memory.
    - "adapter_disabled": LoRA/QLoRA; the reference is the policy with its adapter disabled (no
      second model in memory).
    - "frozen_copy": full training; `load_frozen_copy()` loads a second copy of the starting policy
      (TRL puts it in eval mode)."""
    if cfg[stage].trainer.get("precompute_ref_log_probs", False):
        return None, "precomputed"
    if method != "none":
        return None, "adapter_disabled"
    return load_frozen_copy(), "frozen_copy"


def build_dpo_trainer(cfg: DictConfig, model, ref_model, tokenizer, train_dataset, out: Path, report_to: list[str],
                      peft_config=None, callbacks=None):
    """`ref_model` as `dpo_reference` chose it."""
    from trl import DPOConfig

    args = trl_args(cfg, "dpo", DPOConfig, out, report_to)
    if args.precompute_ref_log_probs:
        check_weights_hashable(ref_model or model)
    return dpo_trainer_class()(model=model, ref_model=ref_model, args=args,
                               train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config,
                               callbacks=callbacks)


def check_weights_hashable(model) -> None:
    """TRL 1.16 keys its cache of precomputed reference log-probs on `hash_module(model)`, which
    reads the state dict. A model loaded already sharded by ZeRO-3 (from_pretrained after a TRL
    config registered DeepSpeed) holds empty placeholders there: every such model hashes the same
    (checked under a 2-process ZeRO-3 launch: two different models, one hash), and a re-run after
    another SFT would silently reuse the old reference log-probs. The stages load models before
    building the TRL config, so this does not happen today; this check keeps it from coming back."""
    empty = [name for name, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise RuntimeError(
            f"precompute_ref_log_probs: {len(empty)} parameter(s) of the reference are empty placeholders "
            f"(ZeRO-3 sharded at load, e.g. {empty[0]}): TRL's cache key would not cover the weights")


def build_kto_trainer(cfg: DictConfig, model, ref_model, tokenizer, train_dataset, out: Path, report_to: list[str],
                      peft_config=None, callbacks=None):
    """KTO on pre-tokenized unpaired rows, from `kto.trainer.*`; `ref_model` as `dpo_reference(..., stage="kto")`
    chose it."""
    from trl import KTOConfig

    args = trl_args(cfg, "kto", KTOConfig, out, report_to)
    if args.precompute_ref_log_probs:
        check_weights_hashable(ref_model or model)  # TRL's KTO cache is keyed on hash_module too
    return kto_trainer_class()(model=model, ref_model=ref_model, args=args,
                               train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config,
                               callbacks=callbacks)


def orpo_config_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig
    return ORPOConfig


def build_orpo_trainer(cfg: DictConfig, model, tokenizer, train_dataset, out: Path, report_to: list[str],
                       peft_config=None, callbacks=None):
    """ORPO (reference-free) on pre-tokenized preference rows, from `orpo.trainer.*`."""
    return orpo_trainer_class()(model=model, args=trl_args(cfg, "orpo", orpo_config_class(), out, report_to),
                                train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config,
                                callbacks=callbacks)


# ------------------------------------------------------------------------------------------------
# TRL arguments from the config


# DPO options that TRL 1.16 reads only for some loss types: anything else would be accepted and
# silently ignored (label smoothing passed through but unused has bitten users before).
LOSS_TYPE_OPTIONS = {"label_smoothing": ({"robust", "exo_pair", "aot", "aot_unpaired"}, 0.0)}


def check_ignored_options(stage: str, kwargs: dict) -> None:
    if stage == "kto" and kwargs.get("loss_type", "kto") == "kto":
        # TRL's KTO estimates its KL term from the other rows of the same micro-batch, in order
        if kwargs.get("per_device_train_batch_size", 8) <= 1:
            raise UserError("kto.trainer.per_device_train_batch_size must be > 1: KTO estimates its KL term from "
                            "the other completions of the same micro-batch",
                            hint="raise it (and lower gradient_accumulation_steps), or use kto.trainer.loss_type=apo_zero_unpaired")
        if kwargs.get("train_sampling_strategy", "sequential") != "sequential":
            raise UserError("kto.trainer.train_sampling_strategy must be sequential: KTO's KL completions are built "
                            "against each row's neighbours in the dataset's order (the data stage shuffles it, seeded)")
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


def liger_usable() -> bool:
    """Liger's kernels are Triton: CUDA and the liger-kernel package (pip install -e '.[gpu]')."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def trl_args(cfg: DictConfig, stage: str, config_cls, out: Path, report_to: list[str]):
    """Build TRL's SFTConfig/DPOConfig/ORPOConfig/KTOConfig from `<stage>.trainer.*`, filling what mistral_tune owns."""
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
    kwargs.setdefault("ddp_timeout", cfg.launcher.timeout_s)  # the collective timeout (runs.init_distributed)
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")  # for tokens/s in metrics.json
    dtype = resolve_dtype(cfg)
    kwargs.setdefault("bf16", dtype == torch.bfloat16)
    kwargs.setdefault("fp16", dtype == torch.float16)
    if kwargs.get("use_liger_kernel") and not liger_usable():
        # Liger's RMSNorm, SwiGLU and RoPE kernels (TRL 1.16 keeps its own fused LM head and turns
        # Liger's fused cross-entropy off) are opt-in: on an H100 with flex_attention neither TRL's
        # nor our SFT finished 8 steps at hidden 2048 in 250 s with them (bench/results/gpu.md).
        raise UserError(
            f"{stage}.trainer.use_liger_kernel=true needs a CUDA GPU and the liger-kernel package (Triton kernels)",
            hint=f"pip install -e '.[gpu]' on a GPU machine, or leave {stage}.trainer.use_liger_kernel unset",
        )
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


# ------------------------------------------------------------------------------------------------
# Resume, guards, metrics


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

    from mistral_tune.training.peers import Heartbeat

    with tracking.tracked(cfg, stage) as report_to:
        start = time.perf_counter()
        trainer = build_trainer(report_to)
        with Heartbeat() as heartbeat:
            try:
                result = trainer.train(resume_from_checkpoint=last_checkpoint(out))
                runtime = time.perf_counter() - start
                trainer.save_model(str(out))
            except Exception as err:
                lost = None if isinstance(err, UserError) else heartbeat.lost()
                if lost:  # the backend's error names no rank; this line does
                    raise UserError(f"{lost} ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                                    hint="re-run the same commands on every machine: training resumes from "
                                         "the last checkpoint") from err
                raise
    metrics = write_metrics(out, trainer, result, runtime, extra_metrics)
    log.info("%s: %d steps, train loss %.4f, %.0f tokens/s (%s attention%s)", stage, result.global_step,
             metrics["train_loss"] or float("nan"), metrics["tokens_per_second"] or 0, metrics["attn_implementation"],
             ", Liger kernels" if metrics["liger_kernel"] else "")
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
        # torchrun's agents (one per machine) set GROUP_WORLD_SIZE; a plain process is one machine
        "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
        "liger_kernel": bool(getattr(trainer.args, "use_liger_kernel", False)),
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


