"""The bundled task: small arithmetic and list questions whose answers can be checked exactly.

A tiny random model learns them in CPU minutes (the sorting and comparison questions within the
first hundred steps, two-digit addition more slowly), so a run's effect is measurable: `check`
tells a right answer from a wrong one. data/make_data.py writes the bundled files with these
generators; evaluation scores generations with `check`.

The bundled preference (issue 23): besides the answer, the demonstrations differ in one behaviour
that SFT alone leaves open. `CHATTER_RATE` of the bundled replies add a line of chatter after the
answer ("64 + 2 = 66\nHope this helps!"); the preference pairs prefer the bare answer. `follows_rule`
judges a reply on that rule alone, `check` on the answer alone (its first line), so the two scores
are independent. The held-out files draw their questions from a part of the question space that
the training files never use (`held_out`), so eval's prompts are new prompts.
"""

from __future__ import annotations

import random
import re
import zlib

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


WORDS = ["apple", "river", "cloud", "stone", "green", "piano", "tiger", "lemon", "ocean", "maple"]


def _repeat(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
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


# The whole question of each task as the generators above write it: a prefix is not enough ("What
# is the capital of France?" is no sum; scoring it would crash on the missing numbers).
_QUESTIONS = {
    "add": re.compile(r"What is \d+ \+ \d+\?"),
    "larger": re.compile(r"Which is larger: \d+ or \d+\?"),
    "sort": re.compile(r"Sort these digits: \d+(?:, \d+)*"),
    "repeat": re.compile(r"Say the word \w+ \d+ times?\."),
}


def task_of(user: str) -> str:
    for name, question in _QUESTIONS.items():
        if question.fullmatch(user.strip()):
            return name
    raise ValueError(f"not a bundled task question: {user!r}")


def answer_line(reply: str) -> str:
    """The answer part of a reply: its first line (chatter, if any, follows on the next)."""
    return reply.strip().split("\n", 1)[0].strip()


def check(user: str, answer: str) -> bool:
    """True when the answer line of `answer` is exactly the correct answer (surrounding whitespace
    ignored). What follows that line is the rule's business (`follows_rule`), not correctness."""
    return answer_line(answer) == expected(task_of(user), user)


# The bundled rule, "answer only": a reply is the task's answer in its form and nothing else.
RULE = "answer only: the reply is the answer in the task's form, with no chatter after it"
CHATTER = ["Hope this helps!", "Let me know if you need more.", "Happy to help!", "Anything else?",
           "That was a nice one."]
CHATTER_RATE = 0.6  # of the SFT replies: above one half, so that SFT's greedy replies mostly chatter
_FORMS = {"add": re.compile(r"\d+ \+ \d+ = \d+"), "larger": re.compile(r"The larger number is \d+\."),
          "sort": re.compile(r"\d(, \d)*"), "repeat": re.compile(r"(\w+)( \1)*")}


def with_chatter(answer: str, rng: random.Random) -> str:
    """The rule broken: the answer, then a line of chatter."""
    return f"{answer}\n{rng.choice(CHATTER)}"


def follows_rule(user: str, reply: str) -> bool | None:
    """Whether `reply` keeps the bundled rule (whatever its correctness): the whole reply is one
    answer of the task's form ("12 + 5 = 17", "The larger number is 8.", "1, 3, 4", "tiger tiger"),
    nothing before or after it. None when `user` is not a bundled task question."""
    try:
        task = task_of(user)
    except ValueError:
        return None
    return _FORMS[task].fullmatch(reply.strip()) is not None


def held_out(user: str) -> bool:
    """Whether a question lies in the held-out part of the question space, which only the eval
    files draw from: one third of each task's questions, so that the held-out files keep the
    training files' mix of tasks. For sorting, the questions whose first three digits fall in that
    third (a held-out "Sort these digits: 1, 2, 3" must not be the start of a training question:
    decontamination would flag it); for repeating, a third of the 30 (word, count) questions chosen
    so that every word and every count still trains."""
    task = task_of(user)
    if task == "repeat":
        word, n = re.search(r"Say the word (\w+) (\d+)", user).groups()
        return (WORDS.index(word) + int(n)) % 3 == 0
    nums = re.findall(r"\d+", user)
    key = f"{task} {' '.join(nums[:3])}"
    return zlib.crc32(key.encode()) % 3 == 0


def question_in(rng: random.Random, held: bool) -> tuple[str, str, str]:
    """`question`, drawn again until it lies in the held-out part of the space (`held`) or not."""
    while True:
        q = question(rng)
        if held_out(q[1]) == held:
            return q


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


def conversation(rng: random.Random, turns: int, held: bool | None = None, chatter: float = 0.0) -> list[dict]:
    """A chat of `turns` questions and their answers; `held`: questions only from the held-out part
    of the space (True) or only from the rest (False), None: any; `chatter`: the fraction of
    replies that break the rule (`with_chatter`)."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(turns):
        _, user, answer = question(rng) if held is None else question_in(rng, held)
        if chatter and rng.random() < chatter:
            answer = with_chatter(answer, rng)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages
