"""What fitting rows into `max_length` / `max_prompt_length` cut, counted per kind.

Every row is tokenised once at start-up (see `jalign.data.pipeline`); the same
pass records what truncation removed, so a run can say how many rows it trains
on cut short, and how long its rows really are, before the first step.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

# The kinds of cut a row can suffer, in report order.
TRUNCATION_KINDS = ("prompt_truncated", "completion_truncated", "end_of_turn_lost")
# Above this fraction of cut rows a run warns, naming the config keys to raise.
WARN_FRACTION = 0.01


class Truncation(NamedTuple):
    """What truncation removed from one tokenised sequence.

    Attributes:
        prompt_truncated: the prompt lost tokens to max_prompt_length.
        completion_truncated: the completion (with its EOS) lost tokens to
            max_length.
        end_of_turn_lost: among them its final EOS / end-of-turn token, so the
            model is never shown where this answer stops.
        prompt_tokens: the untruncated prompt's length, BOS included.
        sequence_tokens: the untruncated sequence's length, BOS and EOS
            included: the max_length that keeps it whole.
    """

    prompt_truncated: bool
    completion_truncated: bool
    end_of_turn_lost: bool
    prompt_tokens: int
    sequence_tokens: int


@dataclasses.dataclass
class TruncationReport:
    """Rows cut to fit the configured lengths, counted per kind.

    A row is one SFT example, one preference pair (cut if either response
    is), one KTO example or one RL prompt.

    Attributes:
        rows: rows seen (those that tokenised).
        truncated: rows with at least one kind of cut.
        counts: kind (TRUNCATION_KINDS) -> number of rows.
        longest_prompt: the longest untruncated prompt, BOS included.
        longest_sequence: the longest untruncated sequence, BOS and EOS included.
    """

    rows: int = 0
    truncated: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    longest_prompt: int = 0
    longest_sequence: int = 0

    def add(self, cuts: Truncation | Sequence[Truncation]) -> None:
        """Counts one row made of one sequence, or of several sharing a prompt (a pair)."""
        cuts = [cuts] if isinstance(cuts, Truncation) else list(cuts)
        self.rows += 1
        kinds = [k for k in TRUNCATION_KINDS if any(getattr(c, k) for c in cuts)]
        self.truncated += bool(kinds)
        self.counts.update(kinds)
        self.longest_prompt = max([self.longest_prompt] + [c.prompt_tokens for c in cuts])
        self.longest_sequence = max([self.longest_sequence] + [c.sequence_tokens for c in cuts])

    def as_dict(self) -> dict[str, int]:
        """summary.json's "truncated_rows": rows, truncated, each kind, longest lengths."""
        return {"rows": self.rows, "truncated": self.truncated,
                **{k: self.counts[k] for k in TRUNCATION_KINDS},
                "longest_prompt_tokens": self.longest_prompt,
                "longest_sequence_tokens": self.longest_sequence}

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {self.counts[k]}" for k in TRUNCATION_KINDS)
        return (f"{self.rows} rows, {self.truncated} cut to fit ({kinds}); longest prompt "
                f"{self.longest_prompt} tokens, longest row {self.longest_sequence} tokens "
                "(BOS and EOS included)")

    def warning(self, *, max_length: int, max_prompt_length: int | None,
                fraction: float = WARN_FRACTION) -> str | None:
        """A warning naming the config keys to raise, if more than `fraction` of rows were cut."""
        if not self.rows or self.truncated <= fraction * self.rows:
            return None
        fixes = []
        if self.counts["prompt_truncated"]:
            fixes.append(f"config.data.max_prompt_length={max_prompt_length} (the longest "
                         f"prompt is {self.longest_prompt} tokens; 0 = no prompt limit)")
        if self.counts["completion_truncated"]:
            fixes.append(f"config.data.max_length={max_length} (the longest row is "
                         f"{self.longest_sequence} tokens)")
        what = ", ".join(f"{k} {self.counts[k]}" for k in TRUNCATION_KINDS)
        return (f"{self.truncated} of {self.rows} rows "
                f"({100 * self.truncated / self.rows:.0f}%) are cut to fit ({what}); raise "
                + " and ".join(fixes))
