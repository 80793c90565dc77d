"""KTO (TRL's KTOTrainer, built by mistral_tune.training.trainers): its data (unpaired rows, or
pairs split into one desirable and one undesirable example), its validation, and one training step
against the KTO loss computed plainly from full logits, one row at a time."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset, load_from_disk

from mistral_tune import cli
from mistral_tune.config import compose
from mistral_tune.datasets import sources
from mistral_tune.datasets.unpaired import unpair_rows
from mistral_tune.errors import UserError
from mistral_tune.formats.tokenizer import build_hf_tokenizer
from mistral_tune.training import trainers
from tests.helpers import tiny_mistral

VOCAB = 32000
BETA = 0.5
LR = 1.0
UNDESIRABLE_WEIGHT = 1.3


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- data


def test_unpair_rows_gives_each_side_its_label():
    rows = {"prompt_ids": [[1, 5], [1, 6], [1, 7]], "chosen_ids": [[8, 2], [9, 2], []],
            "rejected_ids": [[10, 2], [], [11, 2]]}
    assert unpair_rows(rows) == {
        "prompt_ids": [[1, 5], [1, 5], [1, 6], [1, 7]],
        "completion_ids": [[8, 2], [10, 2], [9, 2], [11, 2]],
        "label": [True, False, True, False],
    }


def test_kto_data_splits_pairs_and_keeps_unpaired_rows(tmp_path):
    """Pairs and unpaired rows in one file: every row read is counted, each pair becomes one
    desirable and one undesirable example, and the examples are shuffled with the seed (TRL reads
    them in order) so a pair's halves and one label's rows are not left together."""
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 1}\nAnything else?"}
             for i in range(6)]
    unpaired = [{"prompt": "Say hi.", "completion": "hi", "label": True},
                {"prompt": "Say no.", "completion": "no\nHope this helps!", "label": False}]
    data = _write(tmp_path / "kto.jsonl", pairs + unpaired)
    run = tmp_path / "run"
    assert cli.main(["data", f"run_dir={run}", "stages=[kto]", f"kto.data.files=[{data}]", "logger=none"]) == 0
    report = json.loads((run / "data" / "kto" / "report.json").read_text())
    assert (report["read"], report["kept"], report["rejected"]) == (8, 8, 0)
    assert (report["pairs_split"], report["desirable"], report["undesirable"]) == (6, 7, 7)
    dataset = load_from_disk(str(run / "data" / "kto" / "dataset"))
    assert set(dataset.column_names) == {"prompt_ids", "completion_ids", "label"} and len(dataset) == 14
    tokenizer = build_hf_tokenizer("mistral_v1")
    examples = {(tokenizer.decode(e["prompt_ids"]), tokenizer.decode(e["completion_ids"]), e["label"]) for e in dataset}
    assert ("<s> [INST] What is 3 + 1? [/INST]", "4</s>", True) in examples
    assert ("<s> [INST] What is 3 + 1? [/INST]", "4\nAnything else?</s>", False) in examples
    assert ("<s> [INST] Say no. [/INST]", "no\nHope this helps!</s>", False) in examples
    labels = dataset["label"]
    assert labels != sorted(labels, reverse=True) and labels != [True, False] * 7  # shuffled, not as built


def test_kto_rows_are_validated_with_file_row_and_field(tmp_path):
    good = {"prompt": "Say hi.", "completion": "hi", "label": True}
    data = _write(tmp_path / "bad.jsonl", [good, {"prompt": "Say hi.", "completion": "hi", "label": "false"}])
    with pytest.raises(UserError, match=r"bad\.jsonl, line 2, field label: must be a JSON boolean"):
        sources.load_rows([str(data)], "kto")
    data = _write(tmp_path / "bad2.jsonl", [good, {"prompt": "Say hi.", "label": False}])
    with pytest.raises(UserError, match=r"bad2\.jsonl, line 2, field <row>: unknown format.*prompt/completion/label"):
        sources.load_rows([str(data)], "kto")
    data = _write(tmp_path / "bad3.jsonl", [{"prompt": "Say hi.", "chosen": "hi", "rejected": "hi"}, good])
    result = sources.load_rows([str(data)], "kto", on_error="skip")
    assert (len(result.rows), result.rejects[0].row, result.rejects[0].field) == (1, 1, "rejected")
    assert result.rows[0] == {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "hi", "rejected": None}


# ---------------------------------------------------------------- trainer


def _rows(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": [1] + ids(4, 12), "completion_ids": ids(2, 8) + [2], "label": i % 3 != 1}
            for i in range(n)]


def _logp(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt) - 1:].sum()


def plain_kto_loss(model, ref, rows, beta, undesirable_weight):
    """KTO (Ethayarajh et al. 2024, eq. 7) as TRL 1.16 computes it for one batch: r = log pi(y|x) -
    log ref(y|x) summed over the completion; z = the mean of the same difference over mismatched
    pairs (row i's prompt with row i-1's completion, cyclically), clamped at 0, no gradient; loss
    per row 1 - sigmoid(beta (r - z)) if desirable else undesirable_weight (1 - sigmoid(beta (z - r))),
    averaged over the rows."""
    with torch.no_grad():
        kl = torch.stack([_logp(model, row["prompt_ids"], rows[i - 1]["completion_ids"]) -
                          _logp(ref, row["prompt_ids"], rows[i - 1]["completion_ids"]) for i, row in enumerate(rows)])
        z = kl.mean().clamp(min=0)
    losses = []
    for row in rows:
        with torch.no_grad():
            ref_logp = _logp(ref, row["prompt_ids"], row["completion_ids"])
        r = _logp(model, row["prompt_ids"], row["completion_ids"]) - ref_logp
        if row["label"]:
            losses.append(1 - torch.sigmoid(beta * (r - z)))
        else:
            losses.append(undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    return torch.stack(losses).mean()


def _args(tmp_path, **kw):
    from trl import KTOConfig

    return KTOConfig(**{**dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1, optim="sgd", learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", seed=0,
        activation_checkpointing=False, per_device_train_batch_size=6, beta=BETA, max_grad_norm=0.0,
        undesirable_weight=UNDESIRABLE_WEIGHT, disable_tqdm=True), **kw})


def test_one_kto_step_equals_the_plain_loss(tmp_path):
    """The logged loss is the plain KTO loss against a reference that differs from the policy (so
    r and the KL estimate are not zero), and the step is plain SGD on its gradient."""
    rows = _rows()
    model = tiny_mistral(vocab_size=VOCAB, sliding_window=8).train()
    ref = tiny_mistral(vocab_size=VOCAB, sliding_window=8, seed=1)
    expected_model = copy.deepcopy(model)
    expected = plain_kto_loss(expected_model, ref, rows, BETA, UNDESIRABLE_WEIGHT)
    expected.backward()
    expected_weights = {n: (p - LR * p.grad).detach() for n, p in expected_model.named_parameters()}

    trainer = trainers.kto_trainer_class()(model=model, ref_model=copy.deepcopy(ref), args=_args(tmp_path),
                                           train_dataset=Dataset.from_list(rows),
                                           processing_class=build_hf_tokenizer("mistral_v1"))
    first = trainer.train_dataset[0]
    assert first["completion_ids"] == rows[0]["completion_ids"]  # ids as given, not re-tokenized
    assert first["KL_completion_ids"] == rows[-1]["completion_ids"]  # the batch's last completion, rotated in
    trainer.train()
    logs = next(e for e in trainer.state.log_history if "loss" in e)
    assert logs["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert logs["kl"] > 0, "the KL estimate must be in play, or the comparison proves less"
    moved = False
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected_weights[name], rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(p.detach(), tiny_mistral(vocab_size=VOCAB, sliding_window=8).state_dict()[name])
    assert moved, "the step must change the weights, or the comparison proves nothing"


def test_build_kto_trainer_reads_the_config_and_guards(tmp_path):
    cfg = compose([f"run_dir={tmp_path}", "kto.trainer.beta=0.25", "kto.trainer.max_steps=1",
                   "kto.trainer.per_device_train_batch_size=6", "kto.trainer.undesirable_weight=1.5"])
    model = tiny_mistral(vocab_size=VOCAB).train()
    trainer = trainers.build_kto_trainer(cfg, model, copy.deepcopy(model), build_hf_tokenizer("mistral_v1"),
                                         Dataset.from_list(_rows()), tmp_path / "kto", [])
    assert (trainer.beta, trainer.undesirable_weight) == (0.25, 1.5)
    assert trainer.args.max_length == cfg.kto.data.max_length
    assert any(isinstance(c, trainers.DiskGuard) for c in trainer.callback_handler.callbacks)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(trainers.NonFiniteLoss, match="at step 1"):
        trainer.train()


def test_kto_batch_of_one_is_a_config_error(tmp_path):
    from trl import KTOConfig

    cfg = compose([f"run_dir={tmp_path}", "kto.trainer.per_device_train_batch_size=1"])
    with pytest.raises(UserError, match="per_device_train_batch_size must be > 1"):
        trainers.trl_args(cfg, "kto", KTOConfig, tmp_path / "kto", [])
    cfg = compose([f"run_dir={tmp_path}", "kto.trainer.per_device_train_batch_size=1",
                   "kto.trainer.loss_type=apo_zero_unpaired"])  # no KL term: a batch of one is fine
    assert trainers.trl_args(cfg, "kto", KTOConfig, tmp_path / "kto", []).per_device_train_batch_size == 1


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.extended
def test_sft_then_kto_pipeline(tmp_path):
    """`mistral-tune pipeline "stages=[sft,kto]"`: KTO starts from SFT (reference: a frozen copy of
    it), merge takes KTO, eval has a kto row with SFT as its reference, the card names it."""
    run = tmp_path / "run"
    assert cli.main(["pipeline", f"run_dir={run}", "stages=[sft,kto]", "logger=none", "sft.trainer.max_steps=2",
                     "sft.data.limit=32", "kto.trainer.max_steps=2", "kto.data.limit=16",
                     "eval.max_samples=4"]) == 0
    kto = json.loads((run / "kto" / "manifest.json").read_text())
    assert kto["metrics"]["global_step"] == 2 and kto["metrics"]["reference"] == "frozen_copy"
    assert kto["metrics"]["examples"] == 32 and kto["metrics"]["desirable"] == 16
    assert (run / "kto" / "config.yaml").exists()
    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results) == ["base", "sft", "kto"] and results["kto"]["reference"] == "sft"
    assert "preferred_rate" in results["kto"] and "preference_accuracy" in results["kto"]
    assert "kto" in (run / "merged" / "README.md").read_text()
    # the same command again skips the finished stage
    assert cli.main(["kto", f"run_dir={run}", "stages=[sft,kto]", "logger=none", "sft.trainer.max_steps=2",
                     "sft.data.limit=32", "kto.trainer.max_steps=2", "kto.data.limit=16", "eval.max_samples=4"]) == 0
    assert json.loads((run / "kto" / "manifest.json").read_text())["fingerprint"] == kto["fingerprint"]
