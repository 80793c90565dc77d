"""Lean SFT loss: logits only at the positions that carry a label.

TRL 1.16's SFTTrainer computes per-token log-probs with a tiled "fused LM head"; without Triton
(on CPU) its torch fallback recomputes every vocabulary tile in the backward pass and ran at about
a quarter of a plain forward/backward here. We instead ask the model for logits only at the
positions whose next token is trained (`logits_to_keep` with an index tensor, which transformers
supports natively) and take an ordinary cross-entropy over them. With padding-free batches (one
packed row) that is exactly the trained tokens: for the bundled chats, ~30% of all positions.

The loss is the sum over trained tokens divided by `num_items_in_batch`, the trained-token count
of the whole accumulated batch (over all ranks when `average_tokens_across_devices`), so gradient
accumulation of 4 equals one batch 4 times larger. tests/test_lean.py compares it with the plain
full-logits computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def trained_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions p whose next token p+1 is trained, union over the batch; targets [B, n])."""
    next_labels = labels[:, 1:]
    keep = (next_labels != -100).any(dim=0)
    idx = keep.nonzero().squeeze(-1)
    return idx, next_labels[:, idx]


def lean_forward(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(logits at the trained positions [B, n, V], their targets [B, n], number of trained tokens)."""
    labels = inputs["labels"]
    idx, targets = trained_positions(labels)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    model_inputs["use_cache"] = False
    logits = model(**model_inputs, logits_to_keep=idx).logits
    return logits, targets, int((targets != -100).sum())


def sum_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def _trainer_class():
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss takes logits only where labels are (see the module docstring).
        Anything this path does not cover (custom loss functions, label smoothing, DFT loss, MoE aux
        loss, sequence parallelism) goes through TRL's own compute_loss."""

        def _lean_applies(self) -> bool:
            return (
                self.args.loss_type == "nll"
                and self.compute_loss_func is None
                and self.label_smoother is None
                and not self.aux_loss_enabled
                and getattr(self.accelerator, "parallelism_config", None) is None
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not self._lean_applies():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            logits, targets, n_local = lean_forward(model, inputs)
            denominator = n_local if num_items_in_batch is None else num_items_in_batch
            loss = sum_cross_entropy(logits, targets) / torch.as_tensor(denominator, device=logits.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients across ranks

            with torch.no_grad():
                valid = targets != -100
                correct = ((logits.argmax(-1) == targets) & valid).sum()
                probs = logits.float().softmax(-1)
                entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)[valid].sum()
                gathered = self.accelerator.gather_for_metrics(torch.stack([valid.sum(), correct]).float())
                n_valid, n_correct = gathered.view(-1, 2).sum(0)
                entropy_sum = self.accelerator.gather_for_metrics(entropy.detach()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((n_correct / n_valid.clamp(min=1)).item())
            self._metrics[mode]["entropy"].append((entropy_sum / n_valid.clamp(min=1)).item())
            if mode == "train":
                if "attention_mask" in inputs:
                    local = inputs["attention_mask"].sum()
                else:
                    local = torch.tensor(inputs["input_ids"].numel(), device=logits.device)
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(local).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return LeanSFTTrainer


def lean_sft_trainer():
    return _trainer_class()
