"""The lean LM head against TRL's fused head and the plain full-logits computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

from mistral_tune.training.lean import add_lean_lm_head
from tests.helpers import random_examples, tiny_mistral

PAD = 0
FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def batch_of(rows, padding_free):
    batch = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=padding_free)(copy.deepcopy(rows))
    keep = ("input_ids", "labels", "attention_mask", "position_ids")
    return {k: v for k, v in batch.items() if k in keep}


def plain_loss(model, rows):
    """Reference: right-padded batch, full logits, shifted cross-entropy, mean over trained tokens."""
    batch = batch_of(rows, padding_free=False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / (
        labels != -100
    ).sum()


def head_outputs(model, rows, padding_free, lean):
    model = copy.deepcopy(model)
    (add_lean_lm_head if lean else add_fused_lm_head)(model, outputs=FIELDS)
    out = model(**batch_of(rows, padding_free), fused_lm_head=True)
    model.zero_grad()
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("padding_free", [False, True])
def test_lean_head_equals_trl_fused_head(padding_free):
    """Every field TRL's SFT and DPO trainers read, and the gradients of the loss."""
    model = tiny_mistral(sliding_window=8)  # rows are 12-30 tokens: the window matters
    rows = random_examples(6)
    ref, ref_grads = head_outputs(model, rows, padding_free, lean=False)
    got, got_grads = head_outputs(model, rows, padding_free, lean=True)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.label_mask, ref.label_mask)
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-4, atol=1e-5, msg=field)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("padding_free", [False, True])
def test_lean_loss_equals_plain_full_logits(padding_free):
    model = tiny_mistral(sliding_window=8)
    rows = random_examples(6, seed=1)
    ref = plain_loss(model, rows)
    lean = copy.deepcopy(model)
    add_lean_lm_head(lean)
    got = lean(**batch_of(rows, padding_free), fused_lm_head=True).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_lean_head_projects_only_labelled_positions():
    model = tiny_mistral()
    calls = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    add_lean_lm_head(model)
    rows = random_examples(4)
    batch = batch_of(rows, padding_free=True)
    model(**batch, fused_lm_head=True)
    trained = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    assert calls == [trained] and trained < batch["input_ids"].shape[1]


def test_without_fused_flag_the_forward_is_unchanged():
    model = tiny_mistral()
    ids = torch.tensor([random_examples(1)[0]["input_ids"]])
    before = model(input_ids=ids).logits
    add_lean_lm_head(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)


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


def padded_batch(rows, left: bool):
    """A DPO-style padded batch: labels -100 on the prompt and on the pads (right or left)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids, mask, labels = [], [], []
    for r in rows:
        pad = width - len(r["input_ids"])
        side = (lambda real, fill: [fill] * pad + real) if left else (lambda real, fill: real + [fill] * pad)
        ids.append(side(r["input_ids"], PAD))
        mask.append(side([1] * len(r["input_ids"]), 0))
        labels.append(side(r["labels"], -100))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


@pytest.mark.parametrize("left", [False, True])
def test_packing_of_trl_head_equals_padded_call(left):
    """add_packing (TRL's head on CUDA, DPO's padded batches run padding-free) gives every field,
    the loss and the gradients of the padded call; the window matters (rows 12-30, window 8)."""
    from mistral_tune.training.lean import add_packing

    model = tiny_mistral(sliding_window=8)
    rows = random_examples(6, seed=2)
    batch = padded_batch(rows, left)

    def run(packed):
        m = copy.deepcopy(model)
        add_fused_lm_head(m, outputs=FIELDS)
        if packed:
            add_packing(m)
        seen = []
        m.model.register_forward_hook(lambda mod, inp, kw, out: seen.append(kw["input_ids"].shape), with_kwargs=True)
        out = m(**batch, fused_lm_head=True)
        m.zero_grad()
        (out.log_probs.sum(1) * torch.arange(1.0, 7.0)).sum().backward()  # per-row weights, as DPO's loss has
        return out, {n: p.grad.clone() for n, p in m.named_parameters()}, seen

    ref, ref_grads, ref_seen = run(packed=False)
    got, got_grads, got_seen = run(packed=True)
    assert ref_seen == [batch["input_ids"].shape]
    assert got_seen == [torch.Size([1, int(batch["attention_mask"].sum())])]  # the pads never ran
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert got.log_probs.shape == ref.log_probs.shape == (6, batch["input_ids"].shape[1] - 1)
    assert torch.equal(got.label_mask, ref.label_mask)
    for field in FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-4, atol=1e-5, msg=field)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packing_leaves_other_calls_alone():
    from mistral_tune.training.lean import add_packing

    model = tiny_mistral()
    add_fused_lm_head(model)
    add_packing(model)
    rows = random_examples(3)
    full = batch_of(rows, padding_free=True)  # no attention mask: already padding-free
    seen = []
    model.model.register_forward_hook(lambda mod, inp, kw, out: seen.append(kw["input_ids"].shape), with_kwargs=True)
    model(**full, fused_lm_head=True)
    assert seen == [full["input_ids"].shape]
    ids = torch.tensor([rows[0]["input_ids"]])
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (1, ids.shape[1], 512)
