"""SFT data from a weak teacher with systematic mistakes: an experiment, not a feature.

    python bench/noisy_teacher.py OUT.jsonl [--rate 0.5]
    mistral-tune pipeline run_dir=RUN "sft.data.files=[OUT.jsonl]" pairs=onpolicy logger=none
    mistral-tune eval run_dir=RUN "sft.data.files=[OUT.jsonl]" pairs=onpolicy logger=none force=true \
        "eval.files=[$PWD/data/eval_sft.jsonl]" "eval.pref_files=[$PWD/data/eval_dpo.jsonl]"

data/sft.jsonl's replies are all right, so a verifier knows nothing SFT's data did not already say;
on the tiny demo DPO then cannot lift the held-out score (bench/results/pairs.md). This writes 1,200
chats drawn as data/make_data.py draws sft.jsonl's (seed 1; the teacher's coin flips make them other
chats after the first few), answered by a teacher that, at --rate, makes
one rule-like mistake per task where it can: "larger" answers the first number when the second is
larger, "sort" echoes the input order, "repeat" says the word once too few ("add" stays right: the
tiny model cannot add anyway). Does on-policy DPO with the exact checker undo a mistake that is a
rule? The second command evaluates on the bundled (right) held-out files, as the default run does.
"""

from __future__ import annotations

import argparse
import json
import random
import re

from mistral_tune.datasets import tasks


def mistake(task: str, user: str, right: str) -> str | None:
    nums = [int(x) for x in re.findall(r"\d+", user)]
    if task == "larger" and nums[1] > nums[0]:
        return f"The larger number is {nums[0]}."
    if task == "sort" and nums != sorted(nums):
        return ", ".join(map(str, nums))
    if task == "repeat":
        return " ".join([right.split()[0]] * (nums[-1] - 1))
    return None


def conversation(rng: random.Random, turns: int, rate: float) -> list[dict]:
    """tasks.conversation's draws in the same order, with the teacher's mistakes."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(tasks.SYSTEM_PROMPTS)})
    for _ in range(turns):
        task, user, answer = tasks.question(rng)
        wrong = mistake(task, user, answer)
        if wrong is not None and rng.random() < rate:
            answer = wrong
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--rate", type=float, default=0.5)
    args = parser.parse_args()
    rng = random.Random(1)  # data/make_data.py's seed for sft.jsonl
    with open(args.out, "w") as f:
        for _ in range(1200):
            f.write(json.dumps({"messages": conversation(rng, rng.choice([1, 2, 2, 3]), args.rate)}) + "\n")


if __name__ == "__main__":
    main()
