"""Our DPO trainer (pre-tokenized rows, lean LM head) against TRL's DPOTrainer computation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig

from mistral_tune.training import trainers
from mistral_tune.formats.tokenizer import build_hf_tokenizer
from tests.helpers import tiny_mistral

VOCAB = 32000


def _pairs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = [1] + torch.randint(3, VOCAB, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        chosen = torch.randint(3, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist() + [2]
        rejected = torch.randint(3, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist() + [2]
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return Dataset.from_list(rows)


def _train(tmp_path, lean: bool, monkeypatch, **kw):
    if not lean:  # the same trainer with TRL's own fused LM head left in place
        monkeypatch.setattr(trainers, "lean_heads", lambda *modules: contextlib.nullcontext())
    else:
        monkeypatch.undo()
    model = tiny_mistral(vocab_size=VOCAB, sliding_window=8).train()
    ref = tiny_mistral(vocab_size=VOCAB, sliding_window=8, seed=1)
    args = DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", seed=0,
        gradient_checkpointing=False, per_device_train_batch_size=8, beta=0.1, **kw,
    )
    trainer = trainers.dpo_trainer_class()(model=model, ref_model=ref, args=args, train_dataset=_pairs(),
                                   processing_class=build_hf_tokenizer("mistral_v1"))
    trainer.train()
    logs = next(e for e in trainer.state.log_history if "loss" in e)
    return logs, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "kw", [{}, {"loss_type": ["ipo"]}, {"loss_type": ["robust"], "label_smoothing": 0.2}, {"use_weighting": True}]
)
def test_lean_dpo_matches_trl_head(tmp_path, monkeypatch, kw):
    """Loss, rewards, metrics and the updated weights agree with TRL's head on the same batch, for
    the default sigmoid loss and for options that change the loss (they must not be ignored)."""
    ref_logs, ref_w = _train(tmp_path / "trl", False, monkeypatch, **kw)
    got_logs, got_w = _train(tmp_path / "lean", True, monkeypatch, **kw)
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "entropy"):
        assert got_logs[key] == pytest.approx(ref_logs[key], rel=1e-4, abs=1e-5), key
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dpo_options_change_the_loss(tmp_path, monkeypatch):
    base, _ = _train(tmp_path / "a", True, monkeypatch)
    robust, _ = _train(tmp_path / "b", True, monkeypatch, loss_type=["robust"], label_smoothing=0.2)
    ipo, _ = _train(tmp_path / "c", True, monkeypatch, loss_type=["ipo"])
    assert robust["loss"] != pytest.approx(base["loss"]) and ipo["loss"] != pytest.approx(base["loss"])


def test_label_smoothing_that_trl_would_ignore_is_refused(tmp_path):
    """TRL 1.16's sigmoid loss never reads label_smoothing: accepting it would be a silent no-op."""
    from mistral_tune.config import compose
    from mistral_tune.errors import UserError
    from mistral_tune.training.trainers import trl_args

    cfg = compose([f"run_dir={tmp_path}", "dpo.trainer.label_smoothing=0.1"])
    with pytest.raises(UserError, match="no effect"):
        trl_args(cfg, "dpo", DPOConfig, tmp_path, [])
    cfg = compose([f"run_dir={tmp_path}", "dpo.trainer.label_smoothing=0.1", "dpo.trainer.loss_type=[robust]"])
    assert trl_args(cfg, "dpo", DPOConfig, tmp_path, []).label_smoothing == 0.1


def test_ld_alpha_with_cached_reference_is_refused(tmp_path):
    """TRL's reference cache key ignores ld_alpha (tests/test_ref_cache.py pins that): a re-run
    with another ld_alpha would silently reuse stale reference log-probs."""
    from mistral_tune.config import compose
    from mistral_tune.errors import UserError
    from mistral_tune.training.trainers import trl_args

    cfg = compose([f"run_dir={tmp_path}", "dpo.trainer.precompute_ref_log_probs=true", "dpo.trainer.ld_alpha=0.5"])
    with pytest.raises(UserError, match="ld_alpha"):
        trl_args(cfg, "dpo", DPOConfig, tmp_path, [])
