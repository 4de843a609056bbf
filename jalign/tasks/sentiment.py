"""Continue a review positively: "review: the film was " -> "great, moving"."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import ClassVar

import numpy as np

from jalign.tasks.base import Task

POSITIVE = ("great", "good", "fun", "lovely", "superb", "charming", "moving",
            "brilliant", "wonderful", "delightful", "excellent", "gripping")
NEGATIVE = ("bad", "dull", "boring", "awful", "weak", "slow", "bland", "messy",
            "poor", "tedious", "painful", "flat")
_NOUNS = ("film", "movie", "show", "book", "album", "meal", "game", "play",
          "concert", "hotel", "song", "trip")
_MODIFIERS = ("", "new ", "last ")
_FRAMES = ("the {}was ", "this {}is ", "i thought the {}was ", "my {}felt ")
PROMPTS = tuple(
    "review: " + frame.format(modifier + noun + " ")
    for frame, modifier, noun in itertools.product(_FRAMES, _MODIFIERS, _NOUNS))
_PROMPT_SET = frozenset(PROMPTS)
_PUNCTUATION = ".,!?;:'\""
_ADVERBS = ("a bit", "too", "so", "quite", "very", "really")
_TAILS = ("it was a bit long", "the plot was so so", "it was really quite long",
          "the story was too long", "it was a lot of plot", "and so on and so on")


@dataclasses.dataclass(frozen=True)
class SentimentTask(Task):
    """Continue the start of a review with a few positive words.

    Gold reward, with the completion split on whitespace into ``n`` words
    (case and edge punctuation ignored), ``pos`` the number of *distinct*
    positive words (a repeat counts as neutral) and ``neg`` the number of
    negative ones::

        r = clip((pos - neg) / n, 0, 1) * length_decay ** max(0, n - max_words)

    so all-positive answers of up to ``max_words`` words score 1, fillers and
    repeats dilute the score, and padding beyond ``max_words`` words decays
    it: a labeller that prefers longer answers can be exploited.
    """

    name: ClassVar[str] = "sentiment"
    max_words: int = 6
    length_decay: float = 0.8

    def __post_init__(self):
        if self.max_words < 1 or not 0.0 < self.length_decay <= 1.0:
            raise ValueError(
                f"need max_words >= 1 and 0 < length_decay <= 1, got "
                f"{self.max_words}, {self.length_decay}")

    @property
    def max_prompt_chars(self) -> int:
        return max(len(p) for p in PROMPTS)

    @property
    def max_completion_chars(self) -> int:
        return 40

    def _sample_prompt(self, rng: np.random.Generator) -> str:
        return PROMPTS[rng.integers(len(PROMPTS))]

    def _check(self, prompt: str) -> None:
        if prompt not in _PROMPT_SET:
            raise ValueError(f"not a {self.name!r} prompt: {prompt!r}")

    def reference(self, prompt: str) -> str:
        self._check(prompt)
        digest = hashlib.blake2b(prompt.encode(), digest_size=4).digest()
        first, second = digest[0] % len(POSITIVE), digest[1] % (len(POSITIVE) - 1)
        second += second >= first  # Two distinct words.
        return f"{POSITIVE[first]}, {POSITIVE[second]}"

    def _score(self, prompt: str, completion: str) -> float:
        words = [w.strip(_PUNCTUATION).lower() for w in completion.split()]
        if not words:
            return 0.0
        positive = len({w for w in words if w in POSITIVE})
        negative = sum(w in NEGATIVE for w in words)
        score = max(0.0, (positive - negative) / len(words))
        return score * self.length_decay ** max(0, len(words) - self.max_words)

    def _perfect(self, prompt: str, rng: np.random.Generator) -> str:
        self._check(prompt)
        while True:
            words = rng.choice(POSITIVE, size=rng.integers(1, 4), replace=False)
            answer = rng.choice([", ", " "]).join(words)
            if len(answer) <= 24:
                return answer

    def _imperfect(self, prompt: str, rng: np.random.Generator) -> str:
        self._check(prompt)
        kind = rng.choice(["filler", "mixed", "repeat", "padded", "negative", "neutral"],
                          p=[0.25, 0.15, 0.15, 0.25, 0.1, 0.1])
        good, better = rng.choice(POSITIVE, size=2, replace=False)
        bad, worse = rng.choice(NEGATIVE, size=2, replace=False)
        if kind == "filler":  # "very good and fun": diluted.
            answer = f"{rng.choice(_ADVERBS)} {good}" + rng.choice(["", f" and {better}"])
        elif kind == "mixed":  # "fun but a bit slow": cancels out.
            answer = f"{good} but {rng.choice(_ADVERBS)} {bad}"
        elif kind == "repeat":  # "good, good, good": one distinct word.
            answer = ", ".join([good] * rng.integers(2, 4))
        elif kind == "padded":  # Long and mostly filler: bait for a length bias.
            answer = f"{good} and {better}, {rng.choice(_TAILS)}"
        elif kind == "negative":
            answer = f"{bad} and {worse}"
        else:
            answer = str(rng.choice(_TAILS))
        while len(answer) > self.max_completion_chars:
            answer = answer.rsplit(" ", 1)[0]
        return answer
