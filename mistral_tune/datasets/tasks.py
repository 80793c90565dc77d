"""The bundled task: small arithmetic and list questions whose answers can be checked exactly.

A tiny random model learns them in CPU minutes (the sorting and comparison questions within the
first hundred steps, two-digit addition more slowly), so a run's effect is measurable: `check`
tells a right answer from a wrong one. data/make_data.py writes the bundled files with these
generators; evaluation scores generations with `check`.
"""

from __future__ import annotations

import random
import re

SYSTEM_PROMPTS = [
    "You are a careful assistant. Answer briefly.",
    "Answer with the result only, in one short sentence.",
]


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return "add", f"What is {a} + {b}?", f"{a} + {b} = {a + b}"


def _larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100), 2)
    return "larger", f"Which is larger: {a} or {b}?", f"The larger number is {max(a, b)}."


def _sort(rng: random.Random) -> tuple[str, str, str]:
    nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    listed = ", ".join(map(str, nums))
    return "sort", f"Sort these digits: {listed}", ", ".join(map(str, sorted(nums)))


def _repeat(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(["apple", "river", "cloud", "stone", "green", "piano", "tiger", "lemon", "ocean", "maple"])
    n = rng.randint(2, 4)
    return "repeat", f"Say the word {word} {n} times.", " ".join([word] * n)


TASKS = [_add, _larger, _sort, _repeat]


def question(rng: random.Random) -> tuple[str, str, str]:
    """(task name, user question, correct answer)."""
    return rng.choice(TASKS)(rng)


def expected(task: str, user: str) -> str:
    """The correct answer to a question, recomputed from its text."""
    nums = [int(x) for x in re.findall(r"\d+", user)]
    if task == "add":
        return f"{nums[0]} + {nums[1]} = {nums[0] + nums[1]}"
    if task == "larger":
        return f"The larger number is {max(nums)}."
    if task == "sort":
        return ", ".join(map(str, sorted(nums)))
    if task == "repeat":
        word = re.search(r"Say the word (\w+)", user).group(1)
        return " ".join([word] * nums[-1])
    raise ValueError(f"unknown task {task!r}")


def task_of(user: str) -> str:
    for name, prefix in (("add", "What is"), ("larger", "Which is larger"), ("sort", "Sort these"), ("repeat", "Say the word")):
        if user.startswith(prefix):
            return name
    raise ValueError(f"not a bundled task question: {user!r}")


def check(user: str, answer: str) -> bool:
    """True when `answer` is exactly the correct answer (surrounding whitespace ignored)."""
    return answer.strip() == expected(task_of(user), user)


def wrong_answer(task: str, user: str, rng: random.Random) -> str:
    """A wrong answer of the kinds a small model actually gives, for rejected replies in preference
    pairs: half the time a near miss (off by a little, the other number, one step too many), half
    the time a made-up value (a number or digit that is not in the question)."""
    right = expected(task, user)
    nums = [int(x) for x in re.findall(r"\d+", user)]
    made_up = rng.random() < 0.5
    if task == "add":
        total = nums[0] + nums[1]
        if made_up:
            wrong = rng.choice([v for v in range(200) if v != total])
        else:
            offset = rng.choice([-10, -2, -1, 1, 2, 10])
            wrong = total + (offset if total + offset >= 0 else -offset)
        return f"{nums[0]} + {nums[1]} = {wrong}"
    if task == "larger":
        value = rng.choice([v for v in range(100) if v not in nums]) if made_up else min(nums)
        return f"The larger number is {value}."
    if task == "sort":
        wrong = sorted(nums)
        if made_up:
            i = rng.randrange(len(wrong))
            wrong[i] = rng.choice([d for d in range(10) if d != wrong[i]])
            wrong.sort()
        else:
            while wrong == sorted(nums):
                rng.shuffle(wrong)
                if len(set(nums)) == 1:
                    wrong = nums + [nums[0]]
        return ", ".join(map(str, wrong))
    if task == "repeat":
        word = right.split()[0]
        return " ".join([word] * (nums[-1] + rng.choice([-1, 1])))
    raise ValueError(task)


def conversation(rng: random.Random, turns: int) -> list[dict]:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(turns):
        _, user, answer = question(rng)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages
