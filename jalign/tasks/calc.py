"""Multiply with a calculator: "4821*937=" -> call the tool -> "4517277".

The products are too long for a tiny character-level model to compute, but it
can ask the calculator (the "tools" environment with the "calculator" tool):

    user: 4821*937=
    assistant: <tool_call>{"name":"calculator","arguments":{"expression":"4821*937"}}</tool_call>
    tool: 4517277
    assistant: 4517277

The task is meant for SFT on these conversations and online RL in the tools
environment. Its prompt records and demonstrations are chat messages; prompts,
candidates, preference pairs and unpaired examples stay the base class's
single-turn strings (a direct answer, no tool call).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Sequence

import numpy as np

from jalign.tasks.base import ChatTask, message_text
from jalign.tools import format_tool_call

_PROMPT_RE = re.compile(r"(\d+)\*(\d+)=")


@dataclasses.dataclass(frozen=True)
class CalcTask(ChatTask):
    """Multiply an integer of ``min_digits``..``max_digits`` digits by another.

    Gold reward: exact success, 1.0 when the final assistant turn, stripped of
    surrounding whitespace, is the decimal product, else 0.0 (no partial
    credit: the calculator makes the exact product reachable). Prompts may be
    strings or chat messages (the last user turn counts), completions strings
    or conversations (the final assistant turn counts).

    Demonstrations call the calculator with probability ``quality`` and
    otherwise answer directly with a near-miss product, so an SFT model uses
    the tool only some of the time and RL can teach it to always.
    """

    name: ClassVar[str] = "calc"
    environment: ClassVar[str] = "tools"
    tools: ClassVar[str] = "calculator"
    min_digits: int = 3
    max_digits: int = 4

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")

    @property
    def max_prompt_chars(self) -> int:
        return len("*=") + 2 * self.max_digits

    @property
    def max_completion_chars(self) -> int:
        # The longest assistant turn is the tool call; answers are shorter.
        return len(self._tool_call("9" * self.max_digits + "*" + "9" * self.max_digits))

    # ----------------------------------------------------------------- hooks

    def _sample_operand(self, rng: np.random.Generator) -> int:
        digits = rng.integers(self.min_digits, self.max_digits + 1)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    def _sample_prompt(self, rng: np.random.Generator) -> str:
        return f"{self._sample_operand(rng)}*{self._sample_operand(rng)}="

    def _operands(self, prompt: Any) -> tuple[int, int]:
        text = message_text(prompt, "user")
        match = _PROMPT_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not a {self.name!r} prompt: {prompt!r}")
        return int(match.group(1)), int(match.group(2))

    def reference(self, prompt: Any) -> str:
        """The product; ``prompt`` is a string or chat messages."""
        a, b = self._operands(prompt)
        return str(a * b)

    def _score(self, prompt: str, completion: str) -> float:
        return float(completion.strip() == self.reference(prompt))

    def _imperfect(self, prompt: str, rng: np.random.Generator) -> str:
        a, b = self._operands(prompt)
        product = a * b
        digits = list(str(product))
        kind = rng.choice(
            ["wrong_digit", "off_by_operand", "lost_row", "drop", "extra", "swap"],
            p=[0.3, 0.15, 0.15, 0.15, 0.1, 0.15])
        if kind == "wrong_digit":
            i = rng.integers(len(digits))
            digits[i] = str((int(digits[i]) + rng.integers(1, 10)) % 10)
            if len(digits) > 1 and digits[0] == "0":
                digits[0] = "1"
        elif kind == "off_by_operand":  # a*(b+-1): one row too many or too few.
            return str(max(0, product + int(rng.choice([-1, 1])) * a))
        elif kind == "lost_row":  # Long multiplication missing one partial product.
            place = rng.integers(len(str(b)))
            return str(product - a * (b // 10**place % 10) * 10**place)
        elif kind == "drop" and len(digits) > 1:
            del digits[rng.integers(len(digits))]
        elif kind == "extra":
            digits.insert(rng.integers(1, len(digits) + 1), str(rng.integers(10)))
        elif kind == "swap" and len(digits) > 1:
            i = rng.integers(len(digits) - 1)
            digits[i:i + 2] = digits[i:i + 2][::-1]
        # The caller retries when a variant left the answer correct.
        return "".join(digits)

    # ------------------------------------------------------------ public API

    def demonstrations(
        self, n: int, *, seed: int, quality: float = 1.0, split: str = "train"
    ) -> list[dict[str, Any]]:
        """SFT conversations ``{"prompt": [user], "completion": [turns]}``.

        With probability ``quality`` the completion calls the calculator and
        answers with its result (assistant, tool, assistant); otherwise it is a
        single assistant turn with a near-miss product. Same prompts as the
        base class's string demonstrations, whatever ``quality``.
        """
        examples = []
        for example in super().demonstrations(n, seed=seed, quality=quality, split=split):
            prompt, answer = example["prompt"], example["completion"]
            if answer == self.reference(prompt):    # the perfect ones call the calculator
                completion = [
                    {"role": "assistant", "content": self._tool_call(prompt.removesuffix("="))},
                    {"role": "tool", "content": answer},
                    {"role": "assistant", "content": answer},
                ]
            else:
                completion = [{"role": "assistant", "content": answer}]
            examples.append({"prompt": [{"role": "user", "content": prompt}],
                             "completion": completion})
        return examples

    @staticmethod
    def _tool_call(expression: str) -> str:
        return format_tool_call("calculator", {"expression": expression})
