"""The one record every loader returns: a question with its accepted gold answers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answers: tuple[str, ...]  # accepted gold final answers; a grader accepts any of them
    solution: str | None = None  # reference worked solution (SFT target), when the source has one

    def __post_init__(self):
        # Coerce here so that every loader (and a JSON round trip, where tuples come back as
        # lists) yields the same hashable, comparable record.
        answers = self.answers
        if isinstance(answers, (str, int, float)):
            answers = (answers,)
        answers = tuple(str(a).strip() for a in answers)
        if not answers or any(a == "" for a in answers):
            raise ValueError(f"problem {self.id!r}: needs at least one non-empty gold answer, got {self.answers!r}")
        object.__setattr__(self, "answers", answers)
        object.__setattr__(self, "id", str(self.id))
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"problem {self.id!r}: question must be a non-empty string")

    @property
    def answer(self) -> str:
        """The first (canonical) gold answer."""
        return self.answers[0]
