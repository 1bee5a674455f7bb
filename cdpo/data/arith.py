"""Embedded synthetic task: short multi-step arithmetic word problems in GSM8K style.

Why it exists: a 135M model solves about 3 % of GSM8K, too few correct samples for the
pipeline (positive set, pairs) to work. These problems are short, one operation per step, and
their difficulty is set by two knobs (`steps`, `operand_max`) so that a small model lands in a
useful accuracy band.

Example (steps=2):
    Q: Tom has 5 apples. He buys 3 more apples. Then he gives 4 apples to Zoe.
       How many apples does Tom have now?
    S: Tom starts with 5 apples. He buys 3 more, so he has 5 + 3 = 8 apples.
       He gives 4 to Zoe, so he has 8 - 4 = 4 apples.
       The answer is 4.
"""
from __future__ import annotations

import functools
import hashlib
import random
from typing import Callable

from .records import Problem

# Difficulty knobs: tune these so that the default small model gets 20-60 % right.
DEFAULT_STEPS = 1
DEFAULT_OPERAND_MAX = 5
DEFAULT_SIZES = {"train": 1000, "test": 200}
SPLITS = ("train", "test")

# A question belongs to exactly one split, decided by a hash of its text: one in _TEST_SHARE
# goes to test. So no seed, size or knob setting can ever put a test question into train.
_TEST_SHARE = 5

_PEOPLE = [("Tom", "he", "his"), ("Anna", "she", "her"), ("Ben", "he", "his"), ("Mia", "she", "her"),
           ("Leo", "he", "his"), ("Emma", "she", "her"), ("Sam", "he", "his"), ("Lily", "she", "her")]
_FRIENDS = ["Max", "Zoe", "Nina", "Jack", "Ella", "Omar"]
_ITEMS = ["apple", "marble", "sticker", "cookie", "pencil", "card", "stamp", "shell"]  # plural: + "s"


class _Story:
    """The fixed cast of one problem: who, which objects, and a friend to trade with."""

    def __init__(self, rng: random.Random):
        self.name, self.he, self.his = rng.choice(_PEOPLE)
        self.He = self.he.capitalize()
        self.His = self.his.capitalize()
        self.item = rng.choice(_ITEMS)
        self.items = self.item + "s"
        self.friend = rng.choice(_FRIENDS)

    def noun(self, n: int) -> str:
        # '1 apple', '5 apples': wrong plurals are noise a small model would have to learn.
        return self.item if n == 1 else self.items

    def of(self, n: int) -> str:
        return f"{n} {self.noun(n)}"


# Each step maker returns (question sentence, solution clause before the equation, op, b, result)
# or None when it does not apply to the current value (keeps every result a non-negative integer).
Step = tuple[str, str, str, int, int]


def _buy(rng, s: _Story, a: int, m: int) -> Step:
    b = rng.randint(1, m)
    return f"{s.He} buys {b} more {s.noun(b)}.", f"{s.He} buys {b} more", "+", b, a + b


def _receive(rng, s: _Story, a: int, m: int) -> Step:
    b = rng.randint(1, m)
    return f"{s.He} gets {s.of(b)} from {s.friend}.", f"{s.He} gets {b} from {s.friend}", "+", b, a + b


def _give(rng, s: _Story, a: int, m: int) -> Step | None:
    if a < 2:  # leave at least one, so later steps still read naturally
        return None
    b = rng.randint(1, min(m, a - 1))
    return f"{s.He} gives {s.of(b)} to {s.friend}.", f"{s.He} gives {b} to {s.friend}", "-", b, a - b


def _lose(rng, s: _Story, a: int, m: int) -> Step | None:
    if a < 2:
        return None
    b = rng.randint(1, min(m, a - 1))
    return f"{s.He} loses {s.of(b)}.", f"{s.He} loses {b}", "-", b, a - b


def _multiply(rng, s: _Story, a: int, m: int) -> Step | None:
    ks = [k for k in (2, 3) if a * k <= 4 * m]  # cap growth so numbers stay small
    if not ks:
        return None
    k = rng.choice(ks)
    times = {2: "twice", 3: "three times"}[k]
    return (f"{s.He} buys more until {s.he} has {times} as many {s.items}.",
            f"{s.He} ends up with {times} as many", "*", k, a * k)


def _share(rng, s: _Story, a: int, m: int) -> Step | None:
    ks = [k for k in (2, 3, 4, 5) if a % k == 0 and a > k]  # exact division only
    if not ks:
        return None
    k = rng.choice(ks)
    return (f"{s.He} splits {s.his} {s.items} into {k} equal bags and keeps one bag.",
            f"{s.He} keeps one of {k} equal bags", "/", k, a // k)


_STEP_MAKERS: list[Callable[..., Step | None]] = [_buy, _receive, _give, _lose, _multiply, _share]


def _one_problem(rng: random.Random, steps: int, operand_max: int) -> tuple[str, str, int]:
    s = _Story(rng)
    a = rng.randint(2, max(2, operand_max))
    question = [f"{s.name} has {s.of(a)}."]
    solution = []
    for i in range(steps):
        options = list(_STEP_MAKERS)
        rng.shuffle(options)
        sentence, clause, op, b, c = next(st for st in (mk(rng, s, a, operand_max) for mk in options) if st)
        question.append(sentence if i == 0 else "Then " + sentence[0].lower() + sentence[1:])
        line = f"{clause}, so {s.he} has {a} {op} {b} = {s.of(c)}."
        solution.append(f"{s.name} starts with {s.of(a)}. {line}" if i == 0 else line)
        a = c
    question.append(f"How many {s.items} does {s.name} have now?")
    solution.append(f"The answer is {a}.")
    return " ".join(question), "\n".join(solution), a


def _split_of(question: str) -> str:
    bucket = hashlib.sha256(question.encode("utf-8")).digest()[0] % _TEST_SHARE
    return "test" if bucket == 0 else "train"


def generate_arith(n: int, *, seed: int = 0, steps: int = DEFAULT_STEPS, operand_max: int = DEFAULT_OPERAND_MAX,
                   split: str = "train") -> list[Problem]:
    """n distinct problems of `split`, the same for the same arguments on any machine."""
    if split not in SPLITS:
        raise ValueError(f"arith: unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if n < 0 or steps < 1 or operand_max < 2:
        raise ValueError(f"arith: need n >= 0, steps >= 1, operand_max >= 2 (got {n}, {steps}, {operand_max})")
    # A string seed makes random.Random reproducible across processes (no PYTHONHASHSEED effect).
    rng = random.Random(f"cdpo-arith:{split}:{seed}:{steps}:{operand_max}")
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"arith: only {len(problems)} distinct {split} problems found with steps={steps}, "
                             f"operand_max={operand_max}; raise operand_max or steps, or ask for fewer")
        question, solution, answer = _one_problem(rng, steps, operand_max)
        if question in seen or _split_of(question) != split:
            continue
        seen.add(question)
        problems.append(Problem(id=f"arith-{split}-{len(problems):05d}", question=question,
                                answers=(str(answer),), solution=solution))
    return problems


@functools.lru_cache(maxsize=32)  # built once, not once per prompt
def arith_exemplars(k: int, *, steps: int = DEFAULT_STEPS, operand_max: int = DEFAULT_OPERAND_MAX,
                    seed: int = 10_007) -> tuple[tuple[str, str], ...]:
    """k (question, worked solution) pairs for few-shot prompts, from a seed of their own."""
    return tuple((p.question, p.solution) for p in generate_arith(k, seed=seed, steps=steps, operand_max=operand_max))
