"""Sort a few single digits: "sort: 7 3 9 1\\n" -> "1 3 7 9"."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import numpy as np

from jalign.tasks.base import Task

_PROMPT_RE = re.compile(r"sort: (\d(?: \d)*)\n")
_PREFIX = "sort: "


@dataclasses.dataclass(frozen=True)
class SortTask(Task):
    """Sort ``min_len``..``max_len`` single digits ascending, space separated.

    Gold reward, with ``c`` the whitespace-separated tokens of the completion
    and ``t`` the sorted digits::

        r = (#{i : c_i = t_i} + LCS(c, t)) / (2 * max(|c|, |t|))

    the mean of positional accuracy and longest-common-subsequence overlap,
    both over the longer length so missing and extra elements cost. r = 1
    exactly when the tokens are right; a completion with the right tokens but
    other whitespace gets 0.9.
    """

    name: ClassVar[str] = "sort"
    min_len: int = 3
    max_len: int = 6

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    @property
    def max_prompt_chars(self) -> int:
        return len(_PREFIX) + 2 * self.max_len

    @property
    def max_completion_chars(self) -> int:
        # One extra element, or one doubled space.
        return 2 * self.max_len + 1

    def _sample_prompt(self, rng: np.random.Generator) -> str:
        length = rng.integers(self.min_len, self.max_len + 1)
        digits = rng.integers(0, 10, size=length)
        return _PREFIX + " ".join(str(d) for d in digits) + "\n"

    def _digits(self, prompt: str) -> list[str]:
        match = _PROMPT_RE.fullmatch(prompt) if isinstance(prompt, str) else None
        if match is None:
            raise ValueError(f"not a {self.name!r} prompt: {prompt!r}")
        return match.group(1).split(" ")

    def reference(self, prompt: str) -> str:
        return " ".join(sorted(self._digits(prompt)))

    def _score(self, prompt: str, completion: str) -> float:
        target = sorted(self._digits(prompt))
        tokens = completion.split()
        if not tokens:
            return 0.0
        longer = max(len(tokens), len(target))
        positional = sum(c == t for c, t in zip(tokens, target))
        score = (positional + _lcs_length(tokens, target)) / (2 * longer)
        if score == 1.0 and completion != " ".join(target):
            return 0.9
        return score

    def _imperfect(self, prompt: str, rng: np.random.Generator) -> str:
        digits = self._digits(prompt)
        answer = sorted(digits)
        kind = rng.choice(
            ["swap", "wrong_digit", "drop", "extra", "unsorted", "descending", "spacing"],
            p=[0.2, 0.2, 0.15, 0.15, 0.1, 0.1, 0.1])
        if kind == "swap":
            i = rng.integers(len(answer) - 1) if len(answer) > 1 else 0
            answer[i:i + 2] = answer[i:i + 2][::-1]
        elif kind == "wrong_digit":
            i = rng.integers(len(answer))
            answer[i] = str((int(answer[i]) + rng.integers(1, 10)) % 10)
        elif kind == "drop" and len(answer) > 1:
            del answer[rng.integers(len(answer))]
        elif kind == "extra":
            answer.insert(rng.integers(len(answer) + 1), str(rng.integers(10)))
        elif kind == "unsorted":
            answer = digits
        elif kind == "descending":
            answer = answer[::-1]
        elif kind == "spacing":  # Right digits, one doubled space.
            if len(answer) == 1:
                return answer[0] + " "
            i = rng.integers(1, len(answer))
            return " ".join(answer[:i]) + "  " + " ".join(answer[i:])
        # The caller retries when a variant left the answer correct.
        return " ".join(answer)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b))."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b):
            above = row[j + 1]
            row[j + 1] = diagonal + 1 if x == y else max(row[j + 1], row[j])
            diagonal = above
    return row[-1]
