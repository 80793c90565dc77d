"""Our SFT trainer (trainers.sft_trainer_class: lean LM head) against TRL's own SFTTrainer, and gradient-accumulation normalisation."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from mistral_tune.training.trainers import sft_trainer_class
from mistral_tune.formats.tokenizer import build_hf_tokenizer
from tests.helpers import random_examples, tiny_mistral

VOCAB = 32000


@pytest.fixture(scope="module")
def tokenizer():
    return build_hf_tokenizer("mistral_v1")


def _dataset(n=8):
    rows = random_examples(n, vocab_size=VOCAB, seed=11)
    return Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": [int(x != -100) for x in r["labels"]]} for r in rows])


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1, optim="sgd",
        learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
        padding_free=True, max_length=None, gradient_checkpointing=False, seed=0, dataloader_drop_last=False,
    )
    return SFTConfig(**{**base, **kw})


def _train(trainer_cls, tmp_path, tokenizer, **kw):
    model = tiny_mistral(vocab_size=VOCAB, sliding_window=8).train()
    trainer = trainer_cls(model=model, args=_args(tmp_path, **kw), train_dataset=_dataset(), processing_class=tokenizer)
    out = trainer.train()
    return out.training_loss, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lean_trainer_matches_trl_trainer(tmp_path, tokenizer):
    """Same data, same step: the lean loss and the updated weights equal TRL's fused computation."""
    loss_trl, w_trl = _train(SFTTrainer, tmp_path / "trl", tokenizer, per_device_train_batch_size=8)
    loss_lean, w_lean = _train(sft_trainer_class(), tmp_path / "lean", tokenizer, per_device_train_batch_size=8)
    assert loss_lean == pytest.approx(loss_trl, rel=1e-5)
    for name in w_trl:
        torch.testing.assert_close(w_lean[name], w_trl[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("padding_free", [True, False])
def test_gradient_accumulation_equals_larger_batch(tmp_path, tokenizer, padding_free):
    """The loss is the mean over all trained tokens of the accumulated batch, not a mean of
    per-micro-batch means: 4 micro-batches of 2 take the same step as one batch of 8."""
    cls = sft_trainer_class()
    _, big = _train(cls, tmp_path / "big", tokenizer, per_device_train_batch_size=8, padding_free=padding_free)
    _, acc = _train(cls, tmp_path / "acc", tokenizer, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                    padding_free=padding_free)
    moved = False
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(big[name], tiny_mistral(vocab_size=VOCAB, sliding_window=8).state_dict()[name])
    assert moved, "the step must change the weights, or the comparison proves nothing"
