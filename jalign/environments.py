"""Multi-turn environments: what answers the policy between its turns.

An environment is batched over episodes, like a reward function over completions:

    class MyEnv(jalign.environments.Environment):
        def reset(self, rows):            # the prompt records (with their columns)
            return [row["prompt"] for row in rows]        # text or chat messages each
        def step(self, episodes, completions):
            # completions[i]: the policy's latest turn of episodes[i] (text, EOS removed)
            return observations, rewards, done

`step` returns, per episode, an observation (None; a string, which becomes one
message of role `observation_role`; a {"role", "content"} message; or a list of
them), a reward for this turn (a float, or None) and whether the episode ended.
An episode that is not done must get an observation. Observations are rendered
with the tokenizer's chat template (followed by the generation prompt of the
next assistant turn), tokenised, prefilled into the policy's KV cache, and never
trained on (loss mask 0). Per-episode counters an environment keeps in
`episode.stats` (e.g. "tool_calls", "tool_errors") are reported as `env/NAME`,
the mean per episode.

The score of an episode is the sum of its per-turn rewards plus the run's reward
functions (`config.rl.reward_sources`) applied to its prompt and final assistant
turn; the whole conversation reaches them as the `conversation` column.
`config.rl.environment` names one: "tools" (a `ToolEnvironment` over
`config.rl.tools`), a built-in ("guess"), or "python:module.Class" (constructed
without arguments). Left empty, a built-in task's own environment is used (the
`calc` task's calculator tool), else rollouts are single-turn.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

Message = dict[str, Any]
Observation = "str | Message | list[Message] | None"


@dataclasses.dataclass
class Episode:
    """One conversation in progress (what `Environment.step` sees)."""
    row: Mapping[str, Any]             # the prompt record and its columns
    messages: list[Message]            # prompt messages, then assistant / tool / user turns
    turn: int = 0                      # policy turns completed
    state: dict[str, Any] = dataclasses.field(default_factory=dict)   # the environment's own
    stats: dict[str, float] = dataclasses.field(default_factory=dict)  # counters -> env/NAME
    rewards: list[float] = dataclasses.field(default_factory=list)    # per-turn rewards given
    reward_turns: list[int] = dataclasses.field(default_factory=list)  # the turn (0-based) of each

    def count(self, name: str, by: float = 1.0) -> None:
        self.stats[name] = self.stats.get(name, 0.0) + by


class Environment:
    """Base class: single-turn by default (the first turn ends the episode)."""

    # Role of an observation given as a plain string.
    observation_role: str = "user"
    # JSON schemas (Hugging Face `tools` format) passed to the chat template with the prompt.
    tools: list[dict] | None = None

    def reset(self, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        """The initial prompt (text or chat messages) of each row's episode."""
        return [row["prompt"] for row in rows]

    def step(self, episodes: Sequence[Episode], completions: Sequence[str]):
        """(observations, rewards, done), one entry per episode."""
        n = len(episodes)
        return [None] * n, [None] * n, [True] * n
