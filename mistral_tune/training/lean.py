"""Lean LM head: logits only at the positions that carry a label, for SFT and DPO alike.

TRL 1.16 patches every trained model with a "fused LM head" (`fused_lm_head=True` returns per-token
log-probs instead of logits). With Triton (CUDA) it scores only the labelled positions in tiles; on
other devices it scores every position of the batch, full vocabulary, tile by tile, and recomputes
each tile in the backward pass: on this 2-core CPU the SFT step ran at a quarter of a plain
forward/backward. `add_lean_lm_head` replaces that head where Triton is unavailable with a compact
one: the backbone runs once, the LM head projects only the hidden states whose next token has a
label, and an ordinary log-softmax gives the same fields (`log_probs`, `entropy`, `mean_logits`,
`is_top1`, `log_sum_sq_probs`, `label_mask`, `loss`). With padding-free batches that is exactly
the trained tokens (~30% of positions on the bundled chats). On CUDA with Triton, TRL's own tiled
head stays: it is already compact and never materialises [tokens, vocab] logits.

tests/test_lean.py compares every field, and the gradients, with TRL's head and with the plain
full-logits computation, with and without TRL's `temperature` and `cast_lm_head_to_fp32`.
Installing the head in place of TRL's (the patch of TRL internals) lives in
mistral_tune/training/trainers.py, next to every other reach into TRL.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from trl.trainer.utils import FusedCausalLMOutput


def packed_backbone(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run the backbone padding-free and return hidden states in the padded [B, L, H] layout.

    The real tokens of every row are concatenated into one row with positions restarting per
    sequence; without a KV cache transformers then builds a block-diagonal (and sliding-window)
    mask, so each sequence attends only to itself, exactly as in the padded batch. Pads are never
    computed. Scattering back keeps callers (TRL's DPO loss) unchanged.
    """
    keep = attention_mask.bool()
    position_ids = (attention_mask.long().cumsum(1) - 1)[keep][None]
    flat = backbone(input_ids=input_ids[keep][None], position_ids=position_ids, **kwargs).last_hidden_state[0]
    hidden = flat.new_zeros(*input_ids.shape, flat.shape[-1])
    return hidden.masked_scatter(keep[..., None], flat)


# Config fields with which TRL's head transforms the logits (softcapping, scaling) or adds a loss
# (MoE router): the lean head implements none of them, so such a model keeps TRL's head.
UNSUPPORTED_CONFIG = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                      "logits_scaling", "output_router_logits")


def lean_head_supports(model) -> bool:
    config = model.config.get_text_config()
    return not any(getattr(config, name, None) not in (None, False) for name in UNSUPPORTED_CONFIG)


def add_lean_lm_head(model, outputs: tuple[str, ...] = ("log_probs",), temperature: float = 1.0,
                     cast_lm_head_to_fp32: bool = False) -> None:
    """Patch `model.forward` so that `fused_lm_head=True` uses the compact head (see module doc).
    Without `fused_lm_head` the forward is the class's own. `temperature` and `cast_lm_head_to_fp32`
    mean what they mean for TRL's `add_fused_lm_head`: the logits are divided by the temperature
    (loss, log-probs, entropy and mean logits are those of the scaled distribution), and the
    projection runs in float32 outside autocast."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if not lean_head_supports(model):
        raise ValueError(f"the lean LM head does not implement {[n for n in UNSUPPORTED_CONFIG if getattr(model.config, n, None)]}")
    class_forward = type(model).forward
    backbone_attr = model.base_model_prefix

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return class_forward(self, *args, **kwargs)
        kwargs["use_cache"] = False  # with a KV cache transformers drops the packed-sequence mask
        backbone = getattr(self, backbone_attr)
        attention_mask = kwargs.get("attention_mask")
        if not args and attention_mask is not None and attention_mask.dim() == 2 and not attention_mask.all():
            kwargs.pop("attention_mask")
            hidden = packed_backbone(backbone, kwargs.pop("input_ids"), attention_mask, **kwargs)
        else:
            hidden = backbone(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        head = self.get_output_embeddings()
        if cast_lm_head_to_fp32:
            with torch.autocast(hidden.device.type, enabled=False):
                bias = None if head.bias is None else head.bias.float()
                logits = F.linear(hidden[mask].float(), head.weight.float(), bias)  # [n_labelled, vocab]
        else:
            logits = head(hidden[mask]).float()  # [n_labelled, vocab]
        if temperature != 1.0:
            logits = logits / temperature
        log_z = logits.logsumexp(-1)
        target = labels[mask]
        per_token = {"log_probs": logits.gather(-1, target[:, None]).squeeze(-1) - log_z}
        with torch.no_grad():
            log_p = logits - log_z[:, None]
            if "entropy" in outputs:
                per_token["entropy"] = -(log_p.exp() * log_p).sum(-1)
            if "mean_logits" in outputs:
                per_token["mean_logits"] = logits.mean(-1)
            if "is_top1" in outputs:
                per_token["is_top1"] = logits.argmax(-1) == target
            if "log_sum_sq_probs" in outputs:
                per_token["log_sum_sq_probs"] = (2 * log_p).logsumexp(-1)
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero, not an error)
        full = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in per_token.items()}
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-full["log_probs"].sum() / denominator,
            log_probs=full["log_probs"],
            entropy=full.get("entropy"),
            log_sum_sq_probs=full.get("log_sum_sq_probs"),
            mean_logits=full.get("mean_logits"),
            is_top1=full.get("is_top1"),
            label_mask=mask,
        )

    forward.lean_lm_head = True  # what is_lean() looks for
    model.forward = types.MethodType(forward, model)


def add_packing(model) -> None:
    """Make a fused-head forward (TRL's Triton head) padding-free for padded batches.

    TRL 1.16's DPOTrainer pads every batch (its `padding_free` "falls back to standard padding"),
    so on CUDA, where TRL's tiled head stays, every pad token ran through every layer. This wraps
    `model.forward`: a `fused_lm_head=True` call with a 2-D attention mask that has pads runs the
    real tokens as one packed row (positions restarting per sequence: transformers then builds
    the per-sequence causal, sliding-window mask, as `packed_backbone` does for the lean head),
    with the labels shifted inside each row first (`shift_labels`, so no sequence is scored on
    the next one's first token), and every per-token field is scattered back to the padded
    [B, L-1] layout the trainer reads. Other calls (no pads, generation, positional inputs) go
    to the forward unchanged. tests/test_lean.py compares fields and gradients with the padded call."""
    fused_forward = model.forward

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, **kwargs):
        attention_mask = kwargs.get("attention_mask")
        if (not fused_lm_head or args or shift_labels is not None or labels is None or attention_mask is None
                or attention_mask.dim() != 2 or attention_mask.all() or "input_ids" not in kwargs):
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                                 **kwargs)
        keep = kwargs.pop("attention_mask").bool()
        input_ids = kwargs.pop("input_ids")
        kwargs.pop("position_ids", None)
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100).masked_fill(~keep, -100)
        out = fused_forward(input_ids=input_ids[keep][None], position_ids=(keep.long().cumsum(1) - 1)[keep][None],
                            shift_labels=shifted[keep][None], fused_lm_head=True, **kwargs)

        def padded(x):  # [1, N] over the real tokens -> [B, L-1], zeros at pads as TRL's head gives
            return None if x is None else x.new_zeros(keep.shape).masked_scatter(keep, x[0])[:, :-1]

        return FusedCausalLMOutput(
            loss=out.loss, log_probs=padded(out.log_probs), entropy=padded(out.entropy),
            log_sum_sq_probs=padded(out.log_sum_sq_probs), mean_logits=padded(out.mean_logits),
            is_top1=padded(out.is_top1), label_mask=padded(out.label_mask), aux_loss=out.aux_loss,
        )

    forward.packed = True
    model.forward = types.MethodType(forward, model)


def is_lean(model) -> bool:
    """Whether `model` (or the base model under a PEFT wrapper) carries the lean head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.forward, "lean_lm_head", False)
