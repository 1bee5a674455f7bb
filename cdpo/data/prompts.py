"""Prompt formats of the paper and the stop strings that end a sampled answer.

gsm8k: "Question: {q}\\nAnswer: "   math: "Problem: {q}\\nSolution: "   chat: the tokenizer's
chat template around the question plus an instruction to end with "The answer is N.".
Few-shot exemplars: built-in GSM8K ones, or a shipped set from data/exemplars (`load_exemplars`).
"""
from __future__ import annotations

from typing import Sequence

CHAT_INSTRUCTION = "Solve step by step and finish with 'The answer is N.' where N is the final answer."

# Completion styles are format strings; "chat" holds the user message (the template is the tokenizer's).
PROMPT_STYLES = {
    "gsm8k": "Question: {q}\nAnswer: ",
    "math": "Problem: {q}\nSolution: ",
    "chat": "{q}\n" + CHAT_INSTRUCTION,
}

_STOP_STRINGS = {"gsm8k": ["\n\nQuestion:"], "math": ["\n\nProblem:"], "chat": []}  # chat: EOS ends the turn
_SOURCE_STYLES = {"gsm8k": "gsm8k", "arith": "gsm8k", "math500": "math"}

# The eight chain-of-thought exemplars of Wei et al. (2022), their questions with worked answers
# written for this project; each ends "The answer is N." like the answers we grade.
GSM8K_EXEMPLARS: list[tuple[str, str]] = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "The grove starts with 15 trees and ends with 21 trees. So the workers planted 21 - 15 = 6 trees. "
     "The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are 3 cars at first and 2 more arrive. So there are 3 + 2 = 5 cars. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Together they had 32 + 42 = 74 chocolates. After eating 35 they have 74 - 35 = 39 left. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason went from 20 lollipops to 12 lollipops. So he gave Denny 20 - 12 = 8 lollipops. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn starts with 5 toys. His mom and dad gave him 2 toys each, which is 2 + 2 = 4 toys. "
     "So he has 5 + 4 = 9 toys. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "From monday to thursday is 4 days. Each day 5 computers were added, so 4 * 5 = 20 computers were added. "
     "Now there are 9 + 20 = 29 computers. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday he had 58 - 23 = 35. After losing 2 more on "
     "wednesday he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Five bagels at $3 each cost 5 * 3 = 15 dollars. Olivia had 23 dollars, so she has 23 - 15 = 8 dollars left. "
     "The answer is 8."),
]


def load_exemplars(name: str) -> list[tuple[str, str]]:
    """(question, worked answer) pairs of data/exemplars/<name>.jsonl (provenance: data/README.md)."""
    from ..io import DataError, iter_jsonl
    from .sources import data_dir

    path = data_dir() / "exemplars" / f"{name}.jsonl"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise DataError(f"data.exemplars={name!r}: no file {path}; shipped sets: {', '.join(known)}")
    return [(r["question"], r["answer"]) for _, r in iter_jsonl(path)]


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known styles: {', '.join(PROMPT_STYLES)}")


def build_prompt(question: str, style: str = "gsm8k", *, n_shot: int = 0, tokenizer=None,
                 exemplars: Sequence[tuple[str, str]] | None = None, strip: bool = False) -> str:
    """The text the model continues; n_shot exemplars (gsm8k and chat styles) come first.

    `exemplars` replaces the GSM8K ones with other (question, worked answer) pairs, e.g. the
    arith task's own (`cdpo.data.arith.arith_exemplars`) or a shipped set (`load_exemplars`).
    `strip` drops trailing whitespace ("Answer:" instead of "Answer: "), as the authors' code does
    with every prompt it samples and evaluates with: the model then writes the space itself.
    """
    _check_style(style)
    pool = GSM8K_EXEMPLARS if exemplars is None else list(exemplars)
    if not 0 <= n_shot <= len(pool):
        raise ValueError(f"n_shot must be between 0 and {len(pool)}, got {n_shot}")
    if style == "math" and n_shot and exemplars is None:
        raise ValueError("the math prompt style has no built-in exemplars; use n_shot=0 or pass exemplars")
    shots = pool[:n_shot]
    if style == "chat":
        if tokenizer is None:
            raise ValueError("prompt style 'chat' needs a tokenizer (its chat template builds the prompt)")
        messages = []
        for q, a in shots:  # exemplars become earlier turns of the conversation
            messages += [{"role": "user", "content": PROMPT_STYLES["chat"].format(q=q)},
                         {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": PROMPT_STYLES["chat"].format(q=question)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = PROMPT_STYLES[style]
    # Exemplar answers follow the template's trailing space directly: "Answer: The grove ...".
    parts = [template.format(q=q) + a for q, a in shots]
    prompt = "\n\n".join(parts + [template.format(q=question)])
    return prompt.rstrip() if strip else prompt


def stop_strings(style: str) -> list[str]:
    """Strings that end a completion: the start of the next "Question:"/"Problem:" block."""
    _check_style(style)
    return list(_STOP_STRINGS[style])


def default_prompt_style(source: str) -> str:
    """gsm8k/arith -> gsm8k, math500 -> math; jsonl:/hf: sources guess "math" from a name containing it."""
    if source in _SOURCE_STYLES:
        return _SOURCE_STYLES[source]
    if source.startswith(("jsonl:", "hf:")):
        return "math" if "math" in source.lower() else "gsm8k"
    raise ValueError(f"unknown data source {source!r}; cannot pick a prompt style")
