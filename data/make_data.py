"""Writes the bundled datasets from mistral_tune.tasks (deterministic: fixed seeds).

    python data/make_data.py

sft.jsonl       OpenAI `messages` chats, 1-3 checkable questions each, some with a system prompt
dpo.jsonl       preference pairs in the UltraFeedback-binarized layout: `prompt` string,
                `chosen`/`rejected` full conversations, `score_chosen`/`score_rejected`
eval_sft.jsonl  held-out chats (another seed) for evaluation
eval_dpo.jsonl  held-out preference pairs
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mistral_tune import tasks

HERE = Path(__file__).resolve().parent


def sft_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": tasks.conversation(rng, turns=rng.choice([1, 2, 2, 3]))} for _ in range(n)]


def dpo_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        history = tasks.conversation(rng, turns=rng.choice([0, 0, 1]))
        task, user, right = tasks.question(rng)
        prompt = history + [{"role": "user", "content": user}]
        wrong = tasks.wrong_answer(task, user, rng)
        rows.append({
            "prompt": user,
            "chosen": prompt + [{"role": "assistant", "content": right}],
            "rejected": prompt + [{"role": "assistant", "content": wrong}],
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        })
    return rows


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {HERE / name}")


if __name__ == "__main__":
    write("sft.jsonl", sft_rows(1200, seed=1))
    write("dpo.jsonl", dpo_rows(600, seed=2))
    write("eval_sft.jsonl", sft_rows(200, seed=101))
    write("eval_dpo.jsonl", dpo_rows(200, seed=102))
