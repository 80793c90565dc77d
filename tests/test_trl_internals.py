"""Every reach into TRL internals (mistral_tune.training.trainers.TRL_INTERNALS) is pinned here: a TRL
upgrade that renames, removes or re-signs one of them, or stops calling the patched head from a
trainer's __init__, fails a test that names it. And the patch passes TRL's head arguments on:
`temperature` and `cast_lm_head_to_fp32` change the lean head's result exactly as they change TRL's."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trl.trainer import dpo_trainer, sft_trainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import add_fused_lm_head

from mistral_tune.training import trainers
from mistral_tune.training.lean import is_lean
from tests.helpers import random_examples, tiny_mistral

FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


@pytest.mark.parametrize("internal", trainers.TRL_INTERNALS, ids=lambda i: i.path)
def test_pinned_internal_is_unchanged(internal):
    trainers.check_internal(internal)  # raises naming the symbol


def test_a_changed_internal_is_named():
    """The check itself: a signature that no longer matches is reported by name, not skipped."""
    moved = trainers.Internal("trl.trainer.utils:add_fused_lm_head", ("model", "outputs"), "test")
    with pytest.raises(RuntimeError, match="trl.trainer.utils:add_fused_lm_head changed"):
        trainers.check_internal(moved)
    with pytest.raises(RuntimeError, match="trl.trainer.utils:no_such_name is gone"):
        trainers.check_internal(trainers.Internal("trl.trainer.utils:no_such_name", (), "test"))


def _sft_rows():
    rows = random_examples(4, vocab_size=32000, seed=2)
    return Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": [int(x != -100) for x in r["labels"]]}
                              for r in rows])


def _pairs():
    return Dataset.from_list([{"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]}] * 2)


def test_trainers_still_install_the_lean_head(tmp_path):
    """TRL's SFTTrainer and DPOTrainer must still call the patched `add_fused_lm_head` from __init__
    (policy and reference); if they stop, the lean head silently switches off. The module globals
    are restored afterwards."""
    from trl import DPOConfig, SFTConfig

    from mistral_tune.formats.tokenizer import build_hf_tokenizer

    tokenizer = build_hf_tokenizer("mistral_v1")
    common = dict(use_cpu=True, bf16=False, report_to=[], max_steps=1, save_strategy="no")
    sft = trainers.sft_trainer_class()(model=tiny_mistral(vocab_size=32000),
                                       args=SFTConfig(output_dir=str(tmp_path / "s"), max_length=None, **common),
                                       train_dataset=_sft_rows(), processing_class=tokenizer)
    assert is_lean(sft.model)
    policy, ref = tiny_mistral(vocab_size=32000), tiny_mistral(vocab_size=32000, seed=1)
    trainers.dpo_trainer_class()(model=policy, ref_model=ref, args=DPOConfig(output_dir=str(tmp_path / "d"), **common),
                                 train_dataset=_pairs(), processing_class=tokenizer)
    assert is_lean(policy) and is_lean(ref)
    assert sft_trainer.add_fused_lm_head is add_fused_lm_head and dpo_trainer.add_fused_lm_head is add_fused_lm_head
    assert any(isinstance(c, trainers.DiskGuard) for c in sft.callback_handler.callbacks)


def _head_out(model, rows, patch, autocast=False, **head_kwargs):
    model = copy.deepcopy(model)
    patch(model, outputs=FIELDS, **head_kwargs)
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=False)(copy.deepcopy(rows))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask")}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch, fused_lm_head=True)
    return out


def _lean_via_patch(model, **kwargs):
    """The head the trainers get: TRL's module global, patched by lean_heads."""
    with trainers.lean_heads(sft_trainer):
        sft_trainer.add_fused_lm_head(model, **kwargs)
    assert is_lean(model)


def _close(a, b, atol):
    for f in ("loss",) + FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if f == "is_top1":
            assert (x != y).float().mean() < 0.02, f  # bf16 ties may flip a token or two
        else:
            torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=atol, msg=f)


def test_temperature_is_honoured_as_trl_does():
    model, rows = tiny_mistral(), random_examples(4, seed=4)
    plain = _head_out(model, rows, add_fused_lm_head)
    trl_hot = _head_out(model, rows, add_fused_lm_head, temperature=0.7)
    lean_hot = _head_out(model, rows, _lean_via_patch, temperature=0.7)
    assert (trl_hot.loss - plain.loss).abs() > 1e-3  # the option matters ...
    _close(lean_hot, trl_hot, atol=1e-5)  # ... and the lean head applies it as TRL does


def test_cast_lm_head_to_fp32_is_honoured_as_trl_does():
    """Under bf16 autocast the projection runs in bf16 unless cast_lm_head_to_fp32: the setting moves
    TRL's log-probs, and the lean head agrees with TRL's in both settings."""
    # equal lengths: no padding, so both heads get the same bf16 backbone output (the lean head runs a
    # padded batch padding-free, which rounds differently in bf16)
    model, rows = tiny_mistral(), random_examples(4, seed=5, min_len=20, max_len=20)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # logits of a trained model's size, so bf16 rounding shows
    trl_bf16 = _head_out(model, rows, add_fused_lm_head, autocast=True)
    trl_fp32 = _head_out(model, rows, add_fused_lm_head, autocast=True, cast_lm_head_to_fp32=True)
    lean_bf16 = _head_out(model, rows, _lean_via_patch, autocast=True)
    lean_fp32 = _head_out(model, rows, _lean_via_patch, autocast=True, cast_lm_head_to_fp32=True)
    assert (trl_fp32.log_probs - trl_bf16.log_probs).abs().max() > 1e-2  # the option matters (0.034 here)
    _close(lean_fp32, trl_fp32, atol=1e-5)
    _close(lean_bf16, trl_bf16, atol=1e-5)


def test_an_unknown_head_argument_is_an_error_not_dropped():
    with trainers.lean_heads(sft_trainer), pytest.raises(TypeError, match="logit_bias"):
        sft_trainer.add_fused_lm_head(tiny_mistral(), logit_bias=1.0)


def test_a_logit_transform_the_lean_head_lacks_keeps_trls_head():
    model = tiny_mistral()
    model.config.final_logit_softcapping = 30.0
    with trainers.lean_heads(sft_trainer):
        sft_trainer.add_fused_lm_head(model)
    assert not is_lean(model)


def test_orpo_prompt_extraction_and_chat_template_leave_pretokenized_rows_alone():
    """ORPOTrainer.__init__ maps every row through these before tokenize_row (which we override)."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    from mistral_tune.formats.tokenizer import build_hf_tokenizer

    row = {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2]}
    assert maybe_extract_prompt(dict(row)) == row
    assert maybe_apply_chat_template(dict(row), build_hf_tokenizer("mistral_v1")) == row


@pytest.mark.parametrize("attn,packed", [("flex_attention", True), ("flash_attention_2", True), ("sdpa", False)])
def test_where_trls_tiled_head_stays_padded_batches_are_packed_for_packed_attention(monkeypatch, attn, packed):
    """On a Triton device (mocked here) TRL's head stays, and padded batches (DPO) run padding-free
    through it when the attention kernel's cost follows the sequences (flex, FlashAttention);
    with SDPA a packed row would carry a dense mask, so the batch stays padded."""
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    model = tiny_mistral()
    model.config._attn_implementation = attn
    with trainers.lean_heads(dpo_trainer):
        dpo_trainer.add_fused_lm_head(model)
    assert not is_lean(model)
    assert getattr(model.forward, "packed", False) is packed
