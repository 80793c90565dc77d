"""The lean, padding-free SFT loss against the plain full-logits computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from mistral_tune.lean import lean_forward, sum_cross_entropy
from tests.helpers import random_examples, tiny_mistral

PAD = 0


def plain_loss(model, rows):
    """Reference: right-padded batch, full logits, shifted cross-entropy, mean over trained tokens."""
    batch = DataCollatorForLanguageModeling(pad_token_id=PAD)(copy.deepcopy(rows))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / (
        labels != -100
    ).sum()


def lean_loss(model, rows, padding_free: bool):
    batch = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=padding_free)(copy.deepcopy(rows))
    logits, targets, n = lean_forward(model, dict(batch))
    return sum_cross_entropy(logits, targets) / n


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding_free", [False, True])
def test_lean_loss_and_grads_equal_plain(padding_free):
    model = tiny_mistral(sliding_window=8)  # rows are 12-30 tokens: the window matters
    rows = random_examples(6)
    ref = plain_loss(model, rows)
    ref_grads = grads(model, ref)
    got = lean_loss(model, rows, padding_free)
    got_grads = grads(model, got)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lean_keeps_only_trained_positions():
    model = tiny_mistral()
    rows = random_examples(4)
    batch = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)(copy.deepcopy(rows))
    logits, targets, n = lean_forward(model, dict(batch))
    trained = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    assert n == trained
    assert logits.shape[1] == trained  # one packed row: exactly the trained positions, no more
    assert logits.shape[1] < batch["input_ids"].shape[1]


def test_packed_sequences_do_not_attend_to_each_other():
    """Attention leaking across packed sequences is silent (loss looks fine): the logits of the
    second sequence must not change when the first one does. (transformers builds the
    block-diagonal mask from position_ids only without a KV cache: use_cache=False matters.)"""
    model = tiny_mistral(sliding_window=None)
    a, b = random_examples(2, seed=3)
    c = dict(a, input_ids=[1] + [5] * (len(a["input_ids"]) - 1))

    def second_logits(first):
        batch = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)([dict(first), dict(b)])
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return out[0, len(first["input_ids"]):]

    torch.testing.assert_close(second_logits(a), second_logits(c))
    alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    torch.testing.assert_close(second_logits(a), alone.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_sliding_window_exact_at_the_boundary(packed):
    """Position p sees tokens p-W+1..p (W = sliding_window; transformers' SDPA mask and its
    FlashAttention-2 window_size=(W-1, W-1) agree on this), and nothing earlier: changing token
    p-W leaves p unchanged, changing p-W+1 changes it. One layer, so the receptive field is the
    window itself. Checked unpacked and inside a packed row."""
    window = 6
    model = tiny_mistral(sliding_window=window, num_hidden_layers=1)
    seq = random_examples(1, seed=5, min_len=24, max_len=24)[0]["input_ids"]
    p = 20

    def logits_at(ids, pos):
        if packed:
            prefix = random_examples(1, seed=9, min_len=10, max_len=10)[0]["input_ids"]
            batch = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)(
                [{"input_ids": prefix}, {"input_ids": ids}]
            )
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            return out[0, len(prefix) + pos]
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, pos]

    with torch.no_grad():
        base = logits_at(seq, p)
        outside = list(seq)
        outside[p - window] = (seq[p - window] + 7) % 500 + 3
        inside = list(seq)
        inside[p - window + 1] = (seq[p - window + 1] + 7) % 500 + 3
        torch.testing.assert_close(logits_at(outside, p), base)
        assert not torch.allclose(logits_at(inside, p), base)
