"""Evaluation: log-probs against the plain full-logits computation, batched left-padded generation
against one prompt at a time, the task checker, DPO's implicit reward, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path
import math
import subprocess
import sys
import os

import pytest
import torch

from mistral_tune.stages import evaluate
from mistral_tune.formats import templates
from tests.helpers import tiny_mistral

TEMPLATE = "mistral_v1"
CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Sort these digits: 3, 1, 2"},
     {"role": "assistant", "content": "1, 2, 3"}],
    [{"role": "user", "content": "Say the word lemon 3 times."}, {"role": "assistant", "content": "lemon lemon lemon"},
     {"role": "user", "content": "Which is larger: 7 or 70?"}, {"role": "assistant", "content": "The larger number is 70."}],
]


@pytest.fixture(scope="module")
def model():
    return tiny_mistral(vocab_size=32000, sliding_window=8, seed=3)


def test_sequence_logps_equal_full_logits(model):
    seqs = [(e.input_ids, e.assistant_masks) for e in (templates.encode_chat(c, TEMPLATE) for c in CHATS)]
    got = evaluate.sequence_logps(model, seqs, batch_size=2, pad_id=0)  # padded batches
    for (ids, mask), (total, count) in zip(seqs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        want = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
        assert count == sum(mask[1:]) and total == pytest.approx(want, abs=1e-3)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(model):
    prompts = [templates.encode_prompt(c[:-1], TEMPLATE) for c in CHATS]
    assert len({len(p) for p in prompts}) == 3  # different lengths: padding is exercised
    batched = evaluate.generate(model, prompts, pad_id=0, eos_id=2, max_new_tokens=6, batch_size=3)
    single = [evaluate.generate(model, [p], pad_id=0, eos_id=2, max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and all(len(x) <= 6 for x in batched)


def test_score_uses_the_task_checker_else_exact_match():
    assert evaluate.score("What is 12 + 30?", "12 + 30 = 42", " 12 + 30 = 42 ") == ("add", True)
    assert evaluate.score("What is 12 + 30?", "12 + 30 = 42", "12 + 30 = 41") == ("add", False)
    assert evaluate.score("Name a colour.", "blue", "blue") == ("other", True)
    assert evaluate.score("Name a colour.", "blue", "red") == ("other", False)
    # your own eval files: a question that starts like a bundled task is scored by exact match
    assert evaluate.score("What is the capital of France?", "Paris", "Paris") == ("other", True)


def test_rewards_are_dpo_implicit_rewards_against_the_previous_stage():
    # (sum logp, count) per sequence: chosen, rejected of two pairs.
    logps = {"base": [(-10.0, 3), (-10.0, 3), (-8.0, 3), (-9.0, 3)],
             "sft": [(-6.0, 3), (-9.0, 3), (-7.0, 3), (-5.0, 3)],
             "dpo": [(-5.0, 3), (-12.0, 3), (-6.0, 3), (-6.0, 3)]}
    results = {k: {} for k in logps}
    evaluate.add_rewards(results, logps, beta=0.1, reference={"sft": "base", "dpo": "sft"})
    # dpo vs sft: pair 1: 0.1*((-5+6) - (-12+9)) = 0.4; pair 2: 0.1*((-6+7) - (-6+5)) = 0.2
    assert results["dpo"]["reward_margin"] == pytest.approx(0.3) and results["dpo"]["reward_accuracy"] == 1.0
    # sft vs base: pair 1: 0.1*(4 - 1) = 0.3; pair 2: 0.1*(1 - 4) = -0.3
    assert results["sft"]["reward_margin"] == pytest.approx(0.0) and results["sft"]["reward_accuracy"] == 0.5
    assert results["base"]["reward_margin"] is None and results["dpo"]["reference"] == "sft"


def test_each_models_reward_uses_the_beta_its_stage_trained_with():
    from mistral_tune.config import compose

    cfg = compose(["stages=[sft,kto]", "dpo.trainer.beta=0.3", "kto.trainer.beta=0.1"])
    assert evaluate._betas(cfg, ["base", "sft", "kto"]) == {"base": 0.3, "sft": 0.3, "kto": 0.1}
    logps = {"sft": [(-6.0, 3), (-9.0, 3)], "kto": [(-5.0, 3), (-12.0, 3)]}
    results = {"sft": {}, "kto": {}}
    evaluate.add_rewards(results, logps, beta={"sft": 0.3, "kto": 0.1}, reference={"kto": "sft"})
    assert results["kto"]["reward_margin"] == pytest.approx(0.1 * ((-5 + 6) - (-12 + 9)))
    # KTO's beta is part of eval's fingerprint in runs with KTO only (older runs' evals stand)
    from mistral_tune import runs

    assert "kto.trainer.beta" in runs.stage_config(cfg, "eval")
    assert "kto.trainer.beta" not in runs.stage_config(compose([]), "eval")


def test_a_preference_stage_alone_on_the_bundled_pairs_is_scored_on_the_held_out_chats():
    """stages=[orpo] or [kto] on the bundled data: task_score and preferred_rate, not pairs alone."""
    from mistral_tune.config import compose
    from mistral_tune.stages.data import eval_files

    for stages in ("[orpo]", "[kto]"):
        files, kind = eval_files(compose([f"stages={stages}"]), "sft")
        assert [Path(f).name for f in files] == ["eval_sft.jsonl"] and kind == "bundled"
    assert eval_files(compose(["stages=[orpo]", "orpo.data.files=[/tmp/mine.jsonl]"]), "sft") == ([], "none")


def test_table_lists_every_model_and_column():
    text = evaluate.table({"base": {"task_score": 0.0, "eval_loss": 10.4, "perplexity": 33000.0},
                           "sft": {"task_score": 0.5, "eval_loss": 0.7, "perplexity": 2.0, "reward_margin": 1.2}})
    lines = text.splitlines()
    assert lines[0].split() == ["model", *evaluate.COLUMNS] and lines[1].startswith("base") and "33000.0" in lines[1]


@pytest.mark.slow
def test_eval_cli_writes_results_table_and_model_card(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    short = ["sft.trainer.max_steps=20", "dpo.trainer.max_steps=4", "sft.data.limit=200", "dpo.data.limit=32",
             "eval.max_samples=16", "logger=none"]
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "pipeline", f"run_dir={tmp_path}", *short],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results) == ["base", "sft", "dpo"]
    for name, r in results.items():
        for key in ("task_score", "preferred_rate", "preference_accuracy", "eval_loss", "perplexity", "samples"):
            assert r[key] is not None, (name, key)
        assert math.isclose(r["perplexity"], math.exp(r["eval_loss"]), rel_tol=1e-6)
        assert 0 <= r["task_score"] <= 1 and len(r["samples"]) == 5
    assert results["base"]["reward_margin"] is None and results["dpo"]["reference"] == "sft"
    assert results["sft"]["eval_loss"] < results["base"]["eval_loss"]  # 20 steps already learn the format
    assert "task_score" in proc.stdout and "dpo" in proc.stdout
    assert (tmp_path / "eval" / "manifest.json").exists()
    card = (tmp_path / "merged" / "README.md").read_text()
    head = card.split("---")[1]
    import yaml

    meta = yaml.safe_load(head)
    # Hub dataset ids only in the metadata: local files are named in the Data table
    assert meta["library_name"] == "transformers" and "datasets" not in meta
    assert meta["model-index"][0]["results"][0]["metrics"]
    counts = json.loads((tmp_path / "data" / "sft" / "report.json").read_text())["per_file"]
    (file, c), = counts.items()
    row = f"| sft | {Path(file).name} | {c['read']} | {c['kept']} | {c['rejected']} |"
    for needle in ("## Data", row, "mistral_v1", "learning_rate", "beta",
                   "## Evaluation", "task_score", "preferred_rate", "AutoModelForCausalLM", "transformers "):
        assert needle in card, needle
    # W&B off still works (logger=none above); rerunning skips the finished evaluation.
    again = subprocess.run([sys.executable, "-m", "mistral_tune", "eval", f"run_dir={tmp_path}", *short],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "eval: already complete" in again.stderr


def test_preferred_rate_is_the_rule_checkers_verdict_on_each_greedy_reply(monkeypatch):
    """preferred_rate: the fraction of greedy replies to bundled task questions that keep the rule
    (tasks.follows_rule), whatever their correctness; replies to other questions and after tool
    results do not count. Compared with the plain count over the decoded replies."""
    from omegaconf import OmegaConf

    from mistral_tune.datasets import tasks
    from mistral_tune.formats.chat_format import ChatFormat

    tokenizer = ChatFormat(TEMPLATE, TEMPLATE).hf_tokenizer()
    cases = [("What is 12 + 30?", "12 + 30 = 42", None), ("What is 12 + 30?", "12 + 30 = 42\nHope this helps!", None),
             ("Sort these digits: 3, 1, 2", "1, 3, 2", None), ("Say the word lemon 3 times.", "lemon\nAnything else?", None),
             ("Name a colour.", "Blue.\nHappy to help!", None), ("What is 5 - 2?", "5 - 2 = 3.\nHi", "tool_answer")]
    data = {"loss": [], "pairs": [], "calls": [],
            "prompts": [{"ids": [1], "user": u, "reference": "Blue.", "task": t} for u, _, t in cases]}
    replies = [tokenizer(r, add_special_tokens=False).input_ids for _, r, _ in cases]
    monkeypatch.setattr(evaluate, "generate", lambda model, prompts, *a: replies)
    cfg = OmegaConf.create({"eval": {"batch_size": 4, "max_new_tokens": 16, "show": 0}})
    result, _ = evaluate.evaluate_model(torch.nn.Linear(1, 1), data, tokenizer, cfg)
    judged = [tasks.follows_rule(u, tokenizer.decode(ids, skip_special_tokens=True).strip())
              for (u, _, t), ids in zip(cases, replies) if t is None]
    judged = [j for j in judged if j is not None]
    assert len(judged) == 4 and result["preferred_rate"] == sum(judged) / len(judged) == 0.5
    assert result["task_score"] == 2 / 6  # 12 + 30 twice: the chatter after the answer line is the rule's business
