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
full-logits computation.
"""

from __future__ import annotations

import types

import torch
from trl.trainer.utils import FusedCausalLMOutput, _use_triton


def add_lean_lm_head(model, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Patch `model.forward` so that `fused_lm_head=True` uses the compact head (see module doc).
    Call it after TRL has added its own head; without `fused_lm_head` the forward is the class's."""
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
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        logits = self.get_output_embeddings()(hidden[mask]).float()  # [n_labelled, vocab]
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

    model.forward = types.MethodType(forward, model)


def patch_trainer_models(trainer, outputs: tuple[str, ...]) -> bool:
    """Swap TRL's head for the lean one on the policy (and a separate reference model)."""
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    if _use_triton(next(model.parameters()).device):
        return False
    add_lean_lm_head(model, outputs)
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        add_lean_lm_head(ref, ("log_probs",))
    return True


def lean_sft_trainer():
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with the lean LM head where TRL's has no fast kernel."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            patch_trainer_models(self, ("log_probs", "entropy", "is_top1"))

    return LeanSFTTrainer
