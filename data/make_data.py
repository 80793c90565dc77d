"""Writes the bundled datasets from mistral_tune.tasks (deterministic: fixed seeds).

    python data/make_data.py

sft.jsonl       OpenAI `messages` chats, 1-3 checkable questions each, some with a system prompt;
                60% of the replies (tasks.CHATTER_RATE) add a line of chatter after the answer
dpo.jsonl       preference pairs in the UltraFeedback-binarized layout: `prompt` string,
                `chosen`/`rejected` full conversations, `score_chosen`/`score_rejected`. Both
                replies are the right answer; the chosen one keeps the bundled rule (the answer
                only, tasks.follows_rule), the rejected one adds chatter: a signal on the rule and
                none on correctness
eval_sft.jsonl  held-out chats (another seed) for evaluation, their questions all from the
                held-out part of the question space (tasks.held_out), which the training files
                never draw from: eval's prompts are new prompts
eval_dpo.jsonl  held-out preference pairs, likewise
tools_sft.jsonl tool use (OpenAI layout, mistral_v3/mistral_v7 only): arithmetic questions that the
                assistant answers by calling a `calculator` tool, reading its result and stating
                it; some rows call twice in parallel, some hold a second question, and some ask a
                non-arithmetic question the assistant answers without the tool. Not used by the
                default pipeline; build it with
                mistral-tune data template=mistral_v3 "sft.data.files=[data/tools_sft.jsonl]" "dpo.data.files=[]"
eval_tools.jsonl held-out tool-use chats (another seed): eval's held-out file when SFT trains on
                tools_sft.jsonl, scored on each tool call and on the answer after the results
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mistral_tune.datasets import tasks

HERE = Path(__file__).resolve().parent


def sft_rows(n: int, seed: int, held: bool) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": tasks.conversation(rng, turns=rng.choice([1, 2, 2, 3]), held=held, chatter=tasks.CHATTER_RATE)}
            for _ in range(n)]


def dpo_rows(n: int, seed: int, held: bool) -> list[dict]:
    """Pairs on the rule alone: the same right answer, bare (chosen) or with chatter (rejected).
    (Pairs of a right and a wrong answer taught this 9M-parameter model nothing measurable:
    bench/results/pairs.md.)"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        history = tasks.conversation(rng, turns=rng.choice([0, 0, 1]), held=held, chatter=tasks.CHATTER_RATE)
        _, user, right = tasks.question_in(rng, held)
        prompt = history + [{"role": "user", "content": user}]
        rows.append({
            "prompt": user,
            "chosen": prompt + [{"role": "assistant", "content": right}],
            "rejected": prompt + [{"role": "assistant", "content": tasks.with_chatter(right, rng)}],
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        })
    return rows


CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate arithmetic.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
_ASK = ["What is {}?", "Compute {}.", "How much is {}?", "Calculate {}.", "{} = ?"]
_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _expression(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*/")
    if op == "/":  # exact integer division
        b, q = rng.randint(2, 25), rng.randint(2, 60)
        return f"{b * q} / {b}", q
    a, b = rng.randint(2, 499), rng.randint(2, 49 if op == "*" else 499)
    return f"{a} {op} {b}", {"+": a + b, "-": a - b, "*": a * b}[op]


def _calls(rng: random.Random, expressions: list[str]) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "".join(rng.choice(_ID_CHARS) for _ in range(9)),  # Mistral's call ids: 9 letters/digits
         "type": "function", "function": {"name": "calculator", "arguments": json.dumps({"expression": e})}}
        for e in expressions]}


def _tool_turn(rng: random.Random, parallel: bool = True) -> list[dict]:
    """One user question and the assistant's way to its answer, through the calculator."""
    if rng.random() < 0.25:  # not arithmetic: answered without the tool
        _, user, answer = tasks.question(rng)
        while tasks.task_of(user) == "add":
            _, user, answer = tasks.question(rng)
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if parallel and rng.random() < 0.25:  # two independent results: two calls in parallel
        (e1, v1), (e2, v2) = _expression(rng), _expression(rng)
        call = _calls(rng, [e1, e2])
        ids = [c["id"] for c in call["tool_calls"]]
        return [{"role": "user", "content": f"What are {e1} and {e2}?"}, call,
                {"role": "tool", "tool_call_id": ids[0], "content": str(v1)},
                {"role": "tool", "tool_call_id": ids[1], "content": str(v2)},
                {"role": "assistant", "content": f"{e1} = {v1} and {e2} = {v2}."}]
    expression, value = _expression(rng)
    call = _calls(rng, [expression])
    return [{"role": "user", "content": rng.choice(_ASK).format(expression)}, call,
            {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": str(value)},
            {"role": "assistant", "content": f"{expression} = {value}."}]


def tool_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        system = rng.random() < 0.3
        turns = rng.choice([1, 1, 1, 2])
        # Rows fit the default max_length (256 tokens, v3 and v7): two-turn rows make single calls
        # and have no system prompt.
        messages = [{"role": "system", "content": rng.choice(tasks.SYSTEM_PROMPTS)}] if system and turns == 1 else []
        for _ in range(turns):
            messages += _tool_turn(rng, parallel=turns == 1)
        rows.append({"tools": [CALCULATOR], "messages": messages})
    return rows


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {HERE / name}")


if __name__ == "__main__":
    write("sft.jsonl", sft_rows(1200, seed=1, held=False))
    write("dpo.jsonl", dpo_rows(600, seed=2, held=False))
    write("eval_sft.jsonl", sft_rows(200, seed=101, held=True))
    write("eval_dpo.jsonl", dpo_rows(200, seed=102, held=True))
    write("tools_sft.jsonl", tool_rows(400, seed=3))
    write("eval_tools.jsonl", tool_rows(100, seed=103))
