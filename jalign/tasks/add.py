"""Add two small numbers: "add: 47+85=" -> "132"."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import numpy as np

from jalign.tasks.base import Task

_PROMPT_RE = re.compile(r"add: (\d+)\+(\d+)=")


@dataclasses.dataclass(frozen=True)
class AddTask(Task):
    """Add two numbers of ``min_digits``..``max_digits`` digits each.

    Gold reward, with ``c`` the completion stripped of surrounding whitespace
    and ``t`` the decimal sum, characters aligned from the right::

        r = #{i : c[-i] = t[-i]} / max(|c|, |t|)

    so each right digit earns credit and a wrong length costs. r = 1 exactly
    when the completion is the sum; the sum with surrounding whitespace gets
    0.9.
    """

    name: ClassVar[str] = "add"
    min_digits: int = 1
    max_digits: int = 2

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")

    @property
    def max_prompt_chars(self) -> int:
        return len("add: +=") + 2 * self.max_digits

    @property
    def max_completion_chars(self) -> int:
        # The sum has up to max_digits + 1 digits; a near-miss may add one.
        return self.max_digits + 2

    def _sample_operand(self, rng: np.random.Generator) -> int:
        digits = rng.integers(self.min_digits, self.max_digits + 1)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    def _sample_prompt(self, rng: np.random.Generator) -> str:
        return f"add: {self._sample_operand(rng)}+{self._sample_operand(rng)}="

    def _operands(self, prompt: str) -> tuple[int, int]:
        match = _PROMPT_RE.fullmatch(prompt) if isinstance(prompt, str) else None
        if match is None:
            raise ValueError(f"not an {self.name!r} prompt: {prompt!r}")
        return int(match.group(1)), int(match.group(2))

    def reference(self, prompt: str) -> str:
        a, b = self._operands(prompt)
        return str(a + b)

    def _score(self, prompt: str, completion: str) -> float:
        target = self.reference(prompt)
        answer = completion.strip()
        if not answer:
            return 0.0
        matches = sum(c == t for c, t in zip(reversed(answer), reversed(target)))
        score = matches / max(len(answer), len(target))
        if score == 1.0 and completion != target:
            return 0.9
        return score

    def _imperfect(self, prompt: str, rng: np.random.Generator) -> str:
        a, b = self._operands(prompt)
        digits = list(str(a + b))
        kind = rng.choice(
            ["wrong_digit", "off_by_one", "off_by_ten", "no_carry", "drop", "extra",
             "swap", "difference"],
            p=[0.2, 0.15, 0.1, 0.15, 0.1, 0.1, 0.1, 0.1])
        if kind == "wrong_digit":
            i = rng.integers(len(digits))
            digits[i] = str((int(digits[i]) + rng.integers(1, 10)) % 10)
            if len(digits) > 1 and digits[0] == "0":
                digits[0] = "1"
        elif kind == "off_by_one":
            return str(max(0, a + b + rng.choice([-1, 1])))
        elif kind == "off_by_ten":
            return str(max(0, a + b + rng.choice([-10, 10])))
        elif kind == "no_carry":  # Column sums mod 10: the classic slip.
            width = max(len(str(a)), len(str(b)))
            columns = zip(str(a).zfill(width), str(b).zfill(width))
            return str(int("".join(str((int(x) + int(y)) % 10) for x, y in columns)))
        elif kind == "drop" and len(digits) > 1:
            del digits[rng.integers(len(digits))]
        elif kind == "extra":
            digits.insert(rng.integers(1, len(digits) + 1), str(rng.integers(10)))
        elif kind == "swap" and len(digits) > 1:
            i = rng.integers(len(digits) - 1)
            digits[i:i + 2] = digits[i:i + 2][::-1]
        elif kind == "difference":
            return str(abs(a - b))
        # The caller retries when a variant left the answer correct.
        return "".join(digits)
