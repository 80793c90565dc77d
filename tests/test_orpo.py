"""ORPO (TRL's experimental ORPOTrainer, built by mistral_tune.training.trainers) on pre-tokenized
preference rows, against the ORPO loss computed plainly from full logits, one row at a time."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from mistral_tune.formats.tokenizer import build_hf_tokenizer
from mistral_tune.training import trainers
from tests.helpers import tiny_mistral

VOCAB = 32000
BETA = 0.5
LR = 1.0


def _pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": [1] + ids(4, 12), "chosen_ids": ids(2, 8) + [2], "rejected_ids": ids(2, 8) + [2]}
            for _ in range(n)]


def plain_orpo_loss(model, rows, beta):
    """ORPO (Hong et al. 2024) as TRL 1.16 and ORPO's reference code compute it: the NLL of the chosen
    sequences (every token after the first, prompt included, averaged over all of them), minus
    beta * the mean over pairs of log sigmoid(log odds(chosen) - log odds(rejected)), where a
    completion's odds use its mean per-token log-prob p: log odds = log p - log(1 - p)."""
    nll_sum, nll_count, ratios = 0.0, 0, []
    for row in rows:
        mean_logp = {}
        for side in ("chosen", "rejected"):
            ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            token_logp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
            mean_logp[side] = token_logp[len(row["prompt_ids"]) - 1:].mean()
            if side == "chosen":
                nll_sum, nll_count = nll_sum - token_logp.sum(), nll_count + len(token_logp)
        lc, lr = mean_logp["chosen"], mean_logp["rejected"]
        log_odds = (lc - torch.log1p(-lc.exp())) - (lr - torch.log1p(-lr.exp()))
        ratios.append(F.logsigmoid(log_odds))
    return nll_sum / nll_count - beta * torch.stack(ratios).mean()


def _args(tmp_path, **kw):
    config_cls = trainers.orpo_config_class()
    return config_cls(**{**dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1, optim="sgd", learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", seed=0,
        activation_checkpointing=False, per_device_train_batch_size=6, beta=BETA, max_grad_norm=0.0,
        disable_tqdm=True, include_num_input_tokens_seen="non_padding"), **kw})


def test_one_orpo_step_equals_the_plain_loss(tmp_path):
    """The logged loss is the plain ORPO loss, and the step is plain SGD on its gradient."""
    rows = _pairs()
    model = tiny_mistral(vocab_size=VOCAB, sliding_window=8).train()
    expected_model = copy.deepcopy(model)
    expected = plain_orpo_loss(expected_model, rows, BETA)
    expected.backward()
    expected_weights = {n: (p - LR * p.grad).detach() for n, p in expected_model.named_parameters()}

    trainer = trainers.orpo_trainer_class()(model=model, args=_args(tmp_path), train_dataset=Dataset.from_list(rows),
                                            processing_class=build_hf_tokenizer("mistral_v1"))
    first = trainer.train_dataset[0]
    assert first["chosen_input_ids"] == rows[0]["prompt_ids"] + rows[0]["chosen_ids"]  # ids as given, not re-tokenized
    trainer.train()
    logs = next(e for e in trainer.state.log_history if "loss" in e)
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-5)
    # tokens/s in metrics.json: every token of both sequences of every pair, pads not counted
    assert trainer.state.num_input_tokens_seen == sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) +
                                                      len(r["rejected_ids"]) for r in rows)
    moved = False
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected_weights[name], rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(p.detach(), tiny_mistral(vocab_size=VOCAB, sliding_window=8).state_dict()[name])
    assert moved, "the step must change the weights, or the comparison proves nothing"


def test_beta_changes_the_loss():
    """beta is not ignored: the plain loss (which the trainer matches) moves with it."""
    model, rows = tiny_mistral(vocab_size=VOCAB), _pairs()
    with torch.no_grad():
        assert plain_orpo_loss(model, rows, 0.1) != pytest.approx(float(plain_orpo_loss(model, rows, 1.0)))


def test_build_orpo_trainer_reads_the_config_and_guards(tmp_path):
    from mistral_tune.config import compose

    cfg = compose([f"run_dir={tmp_path}", "orpo.trainer.beta=0.25", "orpo.trainer.max_steps=1",
                   "orpo.trainer.per_device_train_batch_size=6", "orpo.trainer.activation_checkpointing=false"])
    model = tiny_mistral(vocab_size=VOCAB).train()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    trainer = trainers.build_orpo_trainer(cfg, model, build_hf_tokenizer("mistral_v1"), Dataset.from_list(_pairs()),
                                          tmp_path / "orpo", [])
    assert trainer.beta == 0.25 and trainer.args.max_length == cfg.orpo.data.max_length
    assert any(isinstance(c, trainers.DiskGuard) for c in trainer.callback_handler.callbacks)
    with pytest.raises(trainers.NonFiniteLoss, match="at step 1"):
        trainer.train()
