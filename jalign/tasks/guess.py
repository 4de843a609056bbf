"""Guess a secret number, told "higher" or "lower" after each wrong guess.

    user: guess 1-16 (k7q)
    assistant: 8
    user: higher
    assistant: 12
    user: lower
    assistant: 10

The secret is a fixed hash of the three-character tag in the prompt, so the
base class's ``reference(prompt)`` and prompt-hash split work unchanged, while
the policy, which cannot invert the hash (and never sees an eval tag in
training), has to search. Binary search finds it in at most
``max_guesses = ceil(log2(high)) + 1`` guesses.

Rollouts run in ``GuessEnvironment`` (the built-in environment "guess").
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import string
from typing import Any, ClassVar, Sequence

import numpy as np

from jalign.environments import Environment, Episode
from jalign.tasks.base import ChatTask, _check_count, _check_range, message_text

_TAG_CHARS = string.ascii_lowercase + string.digits
_TAG_LENGTH = 3
_PROMPT_RE = re.compile(r"guess 1-(\d+) \(([a-z0-9]{3})\)")
_GUESS_RE = re.compile(r"\s*(\d{1,9})\s*")


def parse_guess(completion: Any) -> int | None:
    """The number a turn guesses: the whole turn (whitespace aside) is digits; else None."""
    match = _GUESS_RE.fullmatch(completion) if isinstance(completion, str) else None
    return None if match is None else int(match.group(1))


def feedback(guess: int, secret: int) -> str:
    """What the user says to a wrong guess: where the secret lies."""
    return "higher" if secret > guess else "lower"


@dataclasses.dataclass(frozen=True)
class GuessTask(ChatTask):
    """Find a secret integer in 1..``high`` by guessing.

    ``secret = 1 + blake2b("guess/" + tag) mod high``, the tag being the
    prompt's three random characters (46656 tags, so each secret has thousands
    of prompts in either split).

    Gold reward: 1.0 when the final assistant turn is a guess (digits, maybe
    with surrounding whitespace) of the secret, else 0.0; the environment's
    per-turn cost makes shorter searches score more. Prompts may be strings or
    chat messages, completions strings or conversations.

    Demonstrations are binary searches with probability ``quality`` and
    otherwise searches by random guesses consistent with the feedback but never
    at the midpoint, which end at the secret or after ``max_guesses`` guesses.
    Candidates, preference pairs and unpaired examples are single guesses.
    """

    name: ClassVar[str] = "guess"
    environment: ClassVar[str] = "guess"
    high: int = 16

    def __post_init__(self):
        if not 2 <= self.high <= 999:
            raise ValueError(f"high must be in [2, 999], got {self.high}")

    @property
    def max_guesses(self) -> int:
        """ceil(log2(high)) + 1: enough for binary search whatever the secret."""
        return (self.high - 1).bit_length() + 1

    @property
    def max_prompt_chars(self) -> int:
        return len(f"guess 1-{self.high} ()") + _TAG_LENGTH

    @property
    def max_completion_chars(self) -> int:
        return len(str(self.high)) + 2

    # ----------------------------------------------------------------- hooks

    def _sample_prompt(self, rng: np.random.Generator) -> str:
        tag = "".join(rng.choice(list(_TAG_CHARS), size=_TAG_LENGTH))
        return f"guess 1-{self.high} ({tag})"

    def secret(self, prompt: Any) -> int:
        """The secret of ``prompt`` (text or chat messages); ValueError if not this task's."""
        text = message_text(prompt, "user")
        match = _PROMPT_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None or int(match.group(1)) != self.high:
            raise ValueError(f"not a {self.name!r} prompt (1-{self.high}): {prompt!r}")
        digest = hashlib.blake2b(f"guess/{match.group(2)}".encode(), digest_size=8).digest()
        return 1 + int.from_bytes(digest, "little") % self.high

    def reference(self, prompt: Any) -> str:
        return str(self.secret(prompt))

    def _score(self, prompt: str, completion: str) -> float:
        return float(parse_guess(completion) == self.secret(prompt))

    def _imperfect(self, prompt: str, rng: np.random.Generator) -> str:
        return str(rng.integers(1, self.high + 1))  # The caller retries the secret.

    # ------------------------------------------------------------ public API

    def demonstrations(
        self, n: int, *, seed: int, quality: float = 1.0, split: str = "train"
    ) -> list[dict[str, Any]]:
        """SFT conversations ``{"prompt": [user], "completion": [turns]}``.

        The completion alternates assistant guesses and user feedback and ends
        with an assistant guess: a binary search with probability ``quality``,
        else an unwise search (see the class docstring). Same prompts as the
        base class's string demonstrations, whatever ``quality``.
        """
        _check_count(n)
        _check_range("quality", quality, 0.0, 1.0)
        prompt_rng = self._rng(seed, "demonstrations", split)
        coin_rng = self._rng(seed, "demonstrations/coin", split)
        search_rng = self._rng(seed, "demonstrations/answer", split)
        examples = []
        for _ in range(n):
            prompt = self._prompt_in_split(prompt_rng, split)
            secret = self.secret(prompt)
            wise = coin_rng.random() < quality
            guesses = self._search(secret, None if wise else search_rng)
            completion = [{"role": "assistant", "content": str(guesses[0])}]
            for previous, guess in zip(guesses, guesses[1:]):
                completion += [{"role": "user", "content": feedback(previous, secret)},
                               {"role": "assistant", "content": str(guess)}]
            examples.append({"prompt": [{"role": "user", "content": prompt}],
                             "completion": completion})
        return examples

    def _search(self, secret: int, rng: np.random.Generator | None) -> list[int]:
        """Guesses until the secret or ``max_guesses``: midpoints (rng None) or
        random values consistent with the feedback, the midpoint excluded."""
        low, high, guesses = 1, self.high, []
        while len(guesses) < self.max_guesses:
            middle = (low + high) // 2
            if rng is None or low == high:
                guess = middle
            else:
                guess = int(rng.choice([v for v in range(low, high + 1) if v != middle]))
            guesses.append(guess)
            if guess == secret:
                break
            low, high = (guess + 1, high) if secret > guess else (low, guess - 1)
        return guesses


class GuessEnvironment(Environment):
    """The guessing game: ``episode.row["answer"]`` is the secret.

    A turn that guesses the secret (see ``parse_guess``) ends the episode with
    reward 0.0 (the gold reward scores that final turn). Any other turn gets
    reward -0.05, a per-turn cost so that shorter searches score more, and the
    observation "higher" or "lower" (where the secret lies), or "say a number"
    when the turn is not a number (counted as ``env/invalid_guesses``).
    """

    wrong_guess_reward: ClassVar[float] = -0.05

    def step(self, episodes: Sequence[Episode], completions: Sequence[str]):
        observations, rewards, done = [], [], []
        for episode, completion in zip(episodes, completions, strict=True):
            secret = int(episode.row["answer"])
            guess = parse_guess(completion)
            if guess == secret:
                observations.append(None)
                rewards.append(0.0)
                done.append(True)
                continue
            if guess is None:
                episode.count("invalid_guesses")
                observations.append("say a number")
            else:
                observations.append(feedback(guess, secret))
            rewards.append(self.wrong_guess_reward)
            done.append(False)
        return observations, rewards, done
