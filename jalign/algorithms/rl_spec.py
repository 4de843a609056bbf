"""`config.rl` read once: what GRPO, RLOO, PPO and online DPO sample, score and optimise.

One `RlSpec` is built from the config before anything runs (bad values fail there,
naming the key) and shared by the rollout setup and the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jalign.algorithms.episodes import EpisodeSpec, episode_spec
from jalign.algorithms.preference import PreferenceSpec, pair_spec
from jalign.algorithms.reward_sources import ENSEMBLE_COMBINATIONS
from jalign.losses.rl import ADVANTAGE_SCALES, KL_ESTIMATORS, LOSS_AGGREGATIONS
from jalign.tasks import get_task


@dataclasses.dataclass(frozen=True)
class RlSpec:
    algo: str
    group_size: int
    max_new_tokens: int
    temperature: float
    reward_sources: tuple[str, ...]
    reward_weights: tuple[float, ...]
    reward_model: str              # one path, or a comma list (an ensemble)
    kl_beta: float                 # GRPO's KL term / RLOO's KL penalty in the reward
    kl_estimator: str
    scale_rewards: str
    num_iterations: int
    num_minibatches: int
    policy_loss: dict[str, Any]    # keyword options of jalign.losses.rl.clipped_policy_loss
    # PPO with a critic
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    value_clip: float = 0.2
    entropy_coef: float = 0.0
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    critic_init: str = ""
    # DAPO dynamic sampling
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4
    # reward-model ensembles (source "model" with several paths)
    reward_ensemble: str = "mean"
    reward_ensemble_lambda: float = 1.0
    # online DPO: the pairwise loss (config.dpo)
    preference: PreferenceSpec | None = None
    # multi-turn episodes with an environment (None: single-turn rollouts)
    episodes: EpisodeSpec | None = None

    @property
    def uses_reference(self) -> bool:
        """Whether the state keeps a frozen reference (a KL term, or online DPO)."""
        return self.preference is not None or self.kl_beta > 0


def split_reward_sources(text: str) -> tuple[str, ...]:
    """"math_answer,soft_overlong:max=64,cache=16,python:m.f" -> its three sources: a
    `key=value` item continues the parameters of the source before it."""
    items: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if items and "=" in part and ":" not in part:
            items[-1] += "," + part
        else:
            items.append(part)
    return tuple(items)


def _choice(rl, key: str, choices) -> str:
    value = rl[key]
    if value not in choices:
        raise ValueError(f"config.rl.{key} = {value!r} is not valid; valid: {list(choices)}")
    return value


def rl_spec(config) -> RlSpec:
    rl, algo = config.rl, config.algo
    sources = split_reward_sources(rl.reward_sources)
    weights = tuple(float(w) for w in (rl.reward_weights or [1.0] * len(sources)))
    if not sources:
        raise ValueError("config.rl.reward_sources is empty; e.g. 'gold', 'model' or "
                         "'python:module.function'")
    if len(weights) != len(sources):
        raise ValueError(f"config.rl.reward_weights has {len(weights)} entries for "
                         f"{len(sources)} reward sources {list(sources)}")
    for key in ("group_size", "max_new_tokens", "num_iterations", "num_minibatches"):
        if int(rl[key]) < 1:
            raise ValueError(f"config.rl.{key} must be at least 1, got {rl[key]!r}")
    if algo in ("grpo", "rloo", "online_dpo") and int(rl.group_size) < 2:
        raise ValueError(f"config.algo={algo!r} compares completions of a prompt: "
                         f"config.rl.group_size must be at least 2, got {rl.group_size}")
    kl_estimator = _choice(rl, "kl_estimator", KL_ESTIMATORS)
    if rl.dynamic_sampling and algo == "ppo":
        raise ValueError("config.rl.dynamic_sampling drops groups whose rewards tie, which "
                         "only group-relative advantages need (grpo, rloo, online_dpo); PPO's "
                         "critic gives tied groups advantages")
    if int(rl.dynamic_sampling_max_rounds) < 0:
        raise ValueError("config.rl.dynamic_sampling_max_rounds must be >= 0, got "
                         f"{rl.dynamic_sampling_max_rounds!r}")
    rloo = algo == "rloo"
    task = None
    if config.data.get("source", "task") == "task" and config.data.get("task"):
        task = get_task(config.data.task)
    episodes = episode_spec(config, task)
    ensemble = _choice(rl, "reward_ensemble", ENSEMBLE_COMBINATIONS)
    if float(rl.reward_ensemble_lambda) < 0:
        raise ValueError("config.rl.reward_ensemble_lambda must be >= 0, got "
                         f"{rl.reward_ensemble_lambda!r}")
    level = _choice(rl, "importance_sampling_level", ("token", "sequence"))
    dual_clip = float(rl.dual_clip)
    if dual_clip and dual_clip <= 1.0:
        raise ValueError(f"config.rl.dual_clip must be > 1 (or 0 for off), got {dual_clip}")
    policy_loss = dict(clip_eps_low=float(rl.clip_eps_low), clip_eps_high=float(rl.clip_eps_high),
                       loss_aggregation=_choice(rl, "loss_aggregation", LOSS_AGGREGATIONS),
                       # RLOO folds its KL penalty into the reward instead.
                       kl_beta=0.0 if rloo else float(rl.kl_beta), kl_estimator=kl_estimator,
                       use_bias_correction_kl=bool(rl.use_bias_correction_kl),
                       max_completion_length=episodes.episode_tokens if episodes
                       else int(rl.max_new_tokens),
                       dual_clip=dual_clip or None,
                       # TRL's RLOO: one ratio per sequence, exp(sum_t log-ratio)
                       importance_sampling_level="sequence_sum" if rloo else level)
    return RlSpec(
        algo=algo, group_size=int(rl.group_size), max_new_tokens=int(rl.max_new_tokens),
        temperature=float(rl.temperature), reward_sources=sources, reward_weights=weights,
        reward_model=rl.reward_model, kl_beta=float(rl.kl_beta), kl_estimator=kl_estimator,
        scale_rewards=_choice(rl, "scale_rewards", ADVANTAGE_SCALES),
        num_iterations=int(rl.num_iterations), num_minibatches=int(rl.num_minibatches),
        policy_loss=policy_loss, gamma=float(rl.gamma), lam=float(rl.lam),
        vf_coef=float(rl.vf_coef), value_clip=float(rl.value_clip),
        entropy_coef=float(rl.entropy_coef), kl_coef=float(rl.kl_coef),
        kl_target=float(rl.kl_target) or None, kl_horizon=float(rl.kl_horizon),
        critic_init=rl.critic_init, dynamic_sampling=bool(rl.dynamic_sampling),
        dynamic_sampling_max_rounds=int(rl.dynamic_sampling_max_rounds),
        reward_ensemble=ensemble, reward_ensemble_lambda=float(rl.reward_ensemble_lambda),
        preference=pair_spec(config, online=True) if algo == "online_dpo" else None,
        episodes=episodes)
