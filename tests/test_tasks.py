"""The bundled tasks' checkers and the bundled files made from them: the rule checker judges the
form alone, the task checker the answer alone, and the held-out files' questions are new ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mistral_tune.datasets import cleaning, tasks

DATA = Path(__file__).resolve().parents[1] / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def _users(row: dict) -> list[str]:
    messages = row["messages"] if "messages" in row else row["chosen"]
    return [m["content"] for m in messages if m["role"] == "user"]


@pytest.mark.parametrize("user, reply, follows, right", [
    ("What is 12 + 30?", "12 + 30 = 42", True, True),
    ("What is 12 + 30?", "12 + 30 = 42\nHope this helps!", False, True),
    ("What is 12 + 30?", "12 + 30 = 41", True, False),  # the rule is kept by a wrong answer too
    ("What is 12 + 30?", "12 + 30 = 41\nAnything else?", False, False),
    ("What is 12 + 30?", "42", False, False),  # not the task's form
    ("What is 12 + 30?", "12 + 30 = 42 Happy to help!", False, False),  # chatter on the answer's line
    ("What is 12 + 30?", "", False, False),  # an empty reply keeps nothing
    ("Which is larger: 7 or 70?", "The larger number is 70.", True, True),
    ("Which is larger: 7 or 70?", "The larger number is 70.\nThat was a nice one.", False, True),
    ("Sort these digits: 3, 1, 2", "1, 2, 3", True, True),
    ("Sort these digits: 3, 1, 2", "1, 2, 3, 3", True, False),
    ("Say the word lemon 3 times.", "lemon lemon lemon", True, True),
    ("Say the word lemon 3 times.", "lemon lemon", True, False),
    ("Say the word lemon 3 times.", "lemon lemon lemon\nlemon", False, True),
    ("Say the word lemon 3 times.", "lemon lemon tiger", False, False),
])
def test_rule_and_task_checkers_judge_form_and_answer_apart(user, reply, follows, right):
    assert tasks.follows_rule(user, reply) is follows
    assert tasks.check(user, reply) is right


def test_rule_checker_does_not_apply_outside_the_bundled_tasks():
    assert tasks.follows_rule("Name a colour.", "Blue.") is None
    # a bundled task's opening words are not its question (a prefix match crashed on the numbers)
    for user in ("What is the capital of France?", "Sort these socks", "Say the word please.",
                 "Which is larger, the sun or the moon?"):
        assert tasks.follows_rule(user, "Paris") is None
        with pytest.raises(ValueError, match="not a bundled task question"):
            tasks.task_of(user)


def test_with_chatter_breaks_the_rule_and_keeps_the_answer():
    rng = random.Random(0)
    for _ in range(50):
        _, user, answer = tasks.question(rng)
        broken = tasks.with_chatter(answer, rng)
        assert tasks.follows_rule(user, answer) and not tasks.follows_rule(user, broken)
        assert tasks.check(user, answer) and tasks.check(user, broken)


def test_held_out_part_keeps_every_word_and_count_in_training():
    repeat = [(w, n) for w in tasks.WORDS for n in (2, 3, 4)]
    held = [(w, n) for w, n in repeat if tasks.held_out(f"Say the word {w} {n} times.")]
    assert len(held) == 10
    assert {w for w, n in repeat if (w, n) not in held} == set(tasks.WORDS)
    assert {n for w, n in repeat if (w, n) not in held} == {2, 3, 4}
    # A held-out sort question's extensions are held out too (decontamination matches prefixes).
    assert tasks.held_out("Sort these digits: 4, 0, 7") == tasks.held_out("Sort these digits: 4, 0, 7, 1, 1")


def test_bundled_files_follow_the_design():
    """data/make_data.py's output: every held-out question lies in the held-out part and none of the
    training ones; SFT replies chatter at about CHATTER_RATE; every pair is the same right answer,
    bare (chosen) against chatter (rejected); and the data stage's decontamination against the
    held-out files (stages/data.py HELD_OUT_OF) finds nothing to drop."""
    train = _rows("sft.jsonl") + _rows("dpo.jsonl")
    held = _rows("eval_sft.jsonl") + _rows("eval_dpo.jsonl")
    assert all(not tasks.held_out(u) for row in train for u in _users(row))
    assert all(tasks.held_out(u) for row in held for u in _users(row))
    replies = [m["content"] for row in _rows("sft.jsonl") for m in row["messages"] if m["role"] == "assistant"]
    rate = sum(not tasks.follows_rule(u, r) for row in _rows("sft.jsonl")
               for u, r in zip(_users(row), [m["content"] for m in row["messages"] if m["role"] == "assistant"])) / len(replies)
    assert abs(rate - tasks.CHATTER_RATE) < 0.03
    for row in _rows("dpo.jsonl") + _rows("eval_dpo.jsonl"):
        user, chosen, rejected = row["prompt"], row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert tasks.check(user, chosen) and tasks.check(user, rejected)
        assert tasks.follows_rule(user, chosen) and not tasks.follows_rule(user, rejected)
        assert row["chosen"][:-1] == row["rejected"][:-1]
    decontaminator = cleaning.Decontaminator([str(DATA / "eval_sft.jsonl"), str(DATA / "eval_dpo.jsonl")], 13)
    assert decontaminator.prompts > 500
    assert not [r for r in _rows("sft.jsonl") if decontaminator.check(cleaning.row_text(r, "sft"))]
    # ... and it would catch one: a training chat holding a held-out question.
    leaked = {"messages": [{"role": "user", "content": _users(held[0])[-1]}, {"role": "assistant", "content": "x"}]}
    assert decontaminator.check(cleaning.row_text(leaked, "sft"))
