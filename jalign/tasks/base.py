"""The Task base class: prompts, a gold reward, and data made from both.

A task knows how to sample prompts, the correct answer to each prompt, a
graded gold reward in [0, 1], and a noisy candidate generator (perfect answers
mixed with plausible near-misses). From these the base class derives every
data set the pipeline needs: SFT demonstrations with a quality knob,
preference pairs labelled by a possibly flawed labeller, and unpaired
(KTO-style) examples.

Everything is deterministic in ``seed``: each method draws from its own
random stream, seeded by (seed, task name, method, split), and the first k
items of a request for n > k items equal a request for k items. The train and
eval splits partition prompts by a hash of the prompt text, so they never
share a prompt whatever the seed.
"""

from __future__ import annotations

import abc
import hashlib
import zlib
from typing import Any, ClassVar, Sequence

import numpy as np

SPLITS = ("train", "eval")


class Task(abc.ABC):
    """A built-in task with a programmatic gold reward.

    Subclasses define ``name``, ``max_prompt_chars``, ``max_completion_chars``
    and the hooks ``_sample_prompt``, ``reference``, ``_score`` and
    ``_imperfect`` (and ``_perfect`` when a prompt has several perfect
    answers). Completions never contain EOS; the pipeline appends it.
    Multi-turn tasks name their rollout ``environment`` and ``tools`` ("": none).
    """

    name: ClassVar[str]
    # Share of prompts that belong to the eval split.
    eval_fraction: ClassVar[float] = 0.2
    # Share of perfect answers among the candidate generator's outputs.
    perfect_fraction: ClassVar[float] = 0.3
    environment: ClassVar[str] = ""
    tools: ClassVar[str] = ""

    # ----------------------------------------------------------------- hooks

    @property
    @abc.abstractmethod
    def max_prompt_chars(self) -> int:
        """Upper bound on the length of every prompt."""

    @property
    @abc.abstractmethod
    def max_completion_chars(self) -> int:
        """Upper bound on every completion this task generates; a good generation budget."""

    @abc.abstractmethod
    def _sample_prompt(self, rng: np.random.Generator) -> str:
        """One prompt of either split."""

    @abc.abstractmethod
    def reference(self, prompt: str) -> str:
        """The canonical correct completion; ValueError if ``prompt`` is not this task's."""

    @abc.abstractmethod
    def _score(self, prompt: str, completion: str) -> float:
        """Gold reward in [0, 1] of a string completion to a valid prompt; never raises."""

    @abc.abstractmethod
    def _imperfect(self, prompt: str, rng: np.random.Generator) -> str:
        """A plausible near-miss (usually scoring below 1; checked by the caller)."""

    def _perfect(self, prompt: str, rng: np.random.Generator) -> str:
        del rng  # Most tasks have a single correct answer.
        return self.reference(prompt)

    # ------------------------------------------------------------ public API

    def split_of(self, prompt: str) -> str:
        """"train" or "eval": a fixed hash of the prompt text decides."""
        digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
        return "eval" if int.from_bytes(digest, "little") < self.eval_fraction * 2**64 else "train"

    def prompts(self, n: int, *, seed: int, split: str = "train") -> list[str]:
        """``n`` prompts of ``split`` (drawn with replacement)."""
        _check_count(n)
        rng = self._rng(seed, "prompts", split)
        return [self._prompt_in_split(rng, split) for _ in range(n)]

    def prompt_records(self, n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
        """``prompts(n, seed=seed, split=split)`` as prompt-dataset rows: {"prompt",
        "answer"} with the reference completion as the answer (what a verifier checks)."""
        return [{"prompt": p, "answer": self.reference(p)}
                for p in self.prompts(n, seed=seed, split=split)]

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[Any]) -> np.ndarray:
        """Graded gold reward, float32 [n] in [0, 1]; 1 only for a correct completion.

        Any completion is scored (non-strings score 0); a prompt that is not
        this task's raises ValueError.
        """
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(
                f"{len(prompts)} prompts but {len(completions)} completions")
        rewards = np.zeros(len(prompts), np.float32)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            self.reference(prompt)  # Validates the prompt.
            if isinstance(completion, str):
                rewards[i] = min(1.0, max(0.0, self._score(prompt, completion)))
        return rewards

    def candidates(self, prompt: str, n: int, *, seed: int) -> list[str]:
        """``n`` draws from the noisy candidate generator for ``prompt``.

        A perfect answer with probability ``perfect_fraction``, otherwise a
        near-miss (swapped, dropped, extra or wrong elements, repeats, ...).
        """
        _check_count(n)
        self.reference(prompt)
        rng = self._stream(seed, f"candidates/{prompt}")
        return [self._candidate(prompt, rng) for _ in range(n)]

    def demonstrations(
        self, n: int, *, seed: int, quality: float = 1.0, split: str = "train"
    ) -> list[dict[str, str]]:
        """SFT examples ``{"prompt", "completion"}``.

        Each completion is correct with probability ``quality`` and otherwise
        a plausible but imperfect answer (gold reward below 1). The prompts do
        not depend on ``quality``.
        """
        _check_count(n)
        _check_range("quality", quality, 0.0, 1.0)
        prompt_rng = self._rng(seed, "demonstrations", split)
        coin_rng = self._rng(seed, "demonstrations/coin", split)
        answer_rng = self._rng(seed, "demonstrations/answer", split)
        examples = []
        for _ in range(n):
            prompt = self._prompt_in_split(prompt_rng, split)
            if coin_rng.random() < quality:
                completion = self._perfect(prompt, answer_rng)
            else:
                completion = self._imperfect_checked(prompt, answer_rng)
            examples.append({"prompt": prompt, "completion": completion})
        return examples

    def preference_pairs(
        self,
        n: int,
        *,
        seed: int,
        label_noise: float = 0.0,
        length_bias: float = 0.0,
        split: str = "train",
    ) -> list[dict[str, str]]:
        """Preference data ``{"prompt", "chosen", "rejected"}``.

        Two candidates are drawn for a fresh prompt and labelled by
        ``gold_a - gold_b + length_bias * (len_a - len_b) / max(len_a, len_b)``
        (lengths in characters): with ``length_bias > 0`` the labeller favours
        the longer completion, the flawed feedback behind reward hacking.
        Identical candidates and exact ties are skipped, so ``chosen !=
        rejected``. Each label is then flipped with probability
        ``label_noise``; the noise has its own random stream, so changing it
        keeps the same pairs and flips some of them.
        """
        _check_count(n)
        _check_range("label_noise", label_noise, 0.0, 0.5)
        _check_range("length_bias", length_bias, 0.0, float("inf"))
        rng = self._rng(seed, "preference_pairs", split)
        noise_rng = self._rng(seed, "preference_pairs/noise", split)
        pairs = []
        # Ties are rare; the cap turns a degenerate configuration into an error.
        for _ in range(100 * n + 1000):
            if len(pairs) == n:
                break
            prompt = self._prompt_in_split(rng, split)
            a, b = self._candidate(prompt, rng), self._candidate(prompt, rng)
            if a == b:
                continue
            gold_a, gold_b = self.gold_reward([prompt, prompt], [a, b])
            margin = float(gold_a) - float(gold_b)
            margin += length_bias * (len(a) - len(b)) / max(len(a), len(b), 1)
            if abs(margin) < 1e-9:
                continue
            chosen, rejected = (a, b) if margin > 0 else (b, a)
            if noise_rng.random() < label_noise:
                chosen, rejected = rejected, chosen
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        if len(pairs) < n:
            raise RuntimeError(f"task {self.name!r} could not make {n} untied pairs")
        return pairs

    def unpaired(
        self,
        n: int,
        *,
        seed: int,
        label_noise: float = 0.0,
        threshold: float = 0.9,
        split: str = "train",
    ) -> list[dict[str, Any]]:
        """KTO-style data ``{"prompt", "completion", "label"}``.

        ``label`` is True (desirable) when the candidate's gold reward is at
        least ``threshold``, flipped with probability ``label_noise``.
        """
        _check_count(n)
        _check_range("label_noise", label_noise, 0.0, 0.5)
        rng = self._rng(seed, "unpaired", split)
        noise_rng = self._rng(seed, "unpaired/noise", split)
        examples = []
        for _ in range(n):
            prompt = self._prompt_in_split(rng, split)
            completion = self._candidate(prompt, rng)
            label = bool(self.gold_reward([prompt], [completion])[0] >= threshold)
            if noise_rng.random() < label_noise:
                label = not label
            examples.append({"prompt": prompt, "completion": completion, "label": label})
        return examples

    # --------------------------------------------------------------- helpers

    def _rng(self, seed: int, purpose: str, split: str) -> np.random.Generator:
        """The random stream of one (seed, task, purpose, split)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._stream(seed, f"{purpose}/{split}")

    def _stream(self, seed: int, key: str) -> np.random.Generator:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return np.random.default_rng([int(seed), zlib.crc32(f"{self.name}/{key}".encode())])

    def _prompt_in_split(self, rng: np.random.Generator, split: str) -> str:
        for _ in range(10_000):
            prompt = self._sample_prompt(rng)
            if self.split_of(prompt) == split:
                return prompt
        raise RuntimeError(f"task {self.name!r} found no {split!r} prompt in 10000 draws")

    def _candidate(self, prompt: str, rng: np.random.Generator) -> str:
        if rng.random() < self.perfect_fraction:
            return self._perfect(prompt, rng)
        return self._imperfect_checked(prompt, rng)

    def _imperfect_checked(self, prompt: str, rng: np.random.Generator) -> str:
        for _ in range(1000):
            completion = self._imperfect(prompt, rng)
            if self._score(prompt, completion) < 1.0:
                return completion
        raise RuntimeError(f"task {self.name!r} made no imperfect answer for {prompt!r}")


def _check_count(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


def message_text(value: Any, role: str) -> Any:
    """The content of the last ``role`` message of a message list; anything else as is.

    Lets a chat task score prompts and completions given either as text or as
    chat messages (a prompt's last user turn, a conversation's final assistant
    turn). A list without such a message gives None.
    """
    if isinstance(value, (list, tuple)):
        for message in reversed(value):
            if isinstance(message, dict) and message.get("role") == role:
                return message.get("content")
        return None
    return value


class ChatTask(Task):
    """A multi-turn task: its prompt records are chat messages (a user turn) so that the
    chat template frames the turns, and its gold reward reads a prompt's last user turn
    and a conversation's final assistant turn (text is taken as is)."""

    def prompt_records(self, n: int, *, seed: int, split: str = "train") -> list[dict[str, Any]]:
        """Prompt-dataset rows ``{"prompt": [user message], "answer": reference}``."""
        return [{"prompt": [{"role": "user", "content": p}], "answer": self.reference(p)}
                for p in self.prompts(n, seed=seed, split=split)]

    def gold_reward(self, prompts: Sequence[Any], completions: Sequence[Any]) -> np.ndarray:
        """The gold reward of each final assistant turn, float32 [n]."""
        return super().gold_reward([message_text(p, "user") for p in prompts],
                                   [message_text(c, "assistant") for c in completions])
