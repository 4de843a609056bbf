"""Sampling and scoring for online RL, split over the batch like the training batch.

`make_sampler` is a jitted sampler whose output is already in the rollout-batch
layout (with the behaviour log-probs); `sample_and_score` sends the prompts' token
ids to the devices, samples `group_size` completions per prompt, brings back only
the completion tokens (for the text rewards) and returns one score per sequence.
The randomness comes from the train state's (rng, step), so a resumed run samples
the same completions; extra rounds of the same step (dynamic sampling) fold in
their round number.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jalign import sharding as shd
from jalign.algorithms.episodes import (EpisodeRunner, make_environment, score_episodes,
                                        turn_reward_tokens)
from jalign.algorithms.rl_inputs import RlInputs
from jalign.algorithms.rl_spec import RlSpec
from jalign.data.prompts import PROMPT_IDS_KEY
from jalign.distributed import agreed_max, any_process
from jalign.generate import decode_completions, generate, left_pad
from jalign.models.config import ModelConfig

# A step whose groups all tie is reported on its first occurrence and then every this many.
_TIE_WARNING_EVERY = 50

# Folded into the step RNG for sampling (the steps' minibatch shuffle uses 29).
ROLLOUT_STREAM = 17


def batch_sharding(config, params):
    """The loop's batch sharding (mesh read off the params, rules from the config)."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return shd.data_sharding(mesh, shd.rules_from_config(config.get("logical_axis_rules")))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, one copy each (an explicit transfer)."""
    shards = {}
    for shard in x.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate(jax.device_get([shards[k] for k in sorted(shards)]))


def make_sampler(model_cfg: ModelConfig, tokenizer, *, max_new_tokens: int, temperature: float):
    """Jitted `(params, rng, step, round, prompt_BxP, mask_BxP) -> (batch, completion_BxN,
    mask_BxN)`.

    Everything stays on device, split over the batch like the prompts. The batch
    is in the rollout layout (tokens, segment_ids, loss_mask, positions [B, P+N])
    and carries the sampler's behaviour log-probs as `old_logps` [B, P+N-1], aligned
    like a log-prob function's output (no second forward pass; at temperature 1
    they equal the trainer's). The RNG is derived from (rng, step) and, for rounds
    after the first, the round number.
    """
    def sample(params, rng, step, round_, prompt_BxP, mask_BxP):
        rng = jax.random.fold_in(jax.random.fold_in(rng, step), ROLLOUT_STREAM)
        if round_:  # static: the first round's stream is the same with or without more rounds
            rng = jax.random.fold_in(rng, round_)
        out = generate(params, model_cfg, prompt_BxP, mask_BxP, rng, max_new_tokens=max_new_tokens,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, greedy=False,
                       temperature=temperature)
        segments = jnp.concatenate([mask_BxP, out.completion_mask], 1)
        # Position t scores token t + 1: the first completion token sits at P - 1.
        width = prompt_BxP.shape[1]
        old_logps = jnp.concatenate([jnp.zeros((out.logps.shape[0], width - 1), jnp.float32),
                                     out.logps], 1)
        batch = {"tokens": out.tokens, "segment_ids": segments,
                 "loss_mask": jnp.concatenate([jnp.zeros_like(mask_BxP), out.completion_mask], 1),
                 "positions": jnp.maximum(jnp.cumsum(segments, 1) - 1, 0).astype(jnp.int32),
                 "old_logps": old_logps}
        return batch, out.tokens[:, width:], out.completion_mask
    return jax.jit(sample, static_argnums=(3,))


def sample_and_score(state, params, records: Sequence[Mapping], *, sampler, tokenizer, reward,
                     group_size: int, sharding, round_: int = 0):
    """Samples `group_size` completions per prompt record from `params` and scores them.

    `records` carry their prompt token ids (`jalign.data.prompts.prepare_prompt_records`)
    and their columns; `reward(records, prompts, completions, completion_lengths) ->
    (scores, metrics)` (a `CombinedReward`). The prompts go to the devices split over
    the batch; the only arrays that come back are the completion tokens and their mask.
    Returns (device batch, scores on device, host metrics, host scores, the repeated
    records).
    """
    repeated = [r for r in records for _ in range(group_size)]
    encoded = [list(r[PROMPT_IDS_KEY]) for r in repeated]
    width = agreed_max(-(-max(len(e) for e in encoded) // 16) * 16)
    prompt, mask = left_pad(encoded, tokenizer.pad_id, width)
    put = functools.partial(jax.make_array_from_process_local_data, sharding)
    batch, completion, completion_mask = sampler(params, state.rng, state.step, round_,
                                                 put(prompt), put(mask))
    completion, completion_mask = local_rows(completion), local_rows(completion_mask)
    texts = decode_completions(tokenizer, completion, completion_mask)
    lengths = completion_mask.sum(-1)
    scores, metrics = reward(repeated, [r["prompt"] for r in repeated], texts, lengths)
    metrics = {**metrics, "objective/scores": float(scores.mean()),
               "completions/mean_length": float(lengths.mean())}
    return batch, put(scores), metrics, scores, repeated


@functools.partial(jax.jit, static_argnums=2)
def _rollout_rng(rng, step, round_):
    rng = jax.random.fold_in(jax.random.fold_in(rng, step), ROLLOUT_STREAM)
    return jax.random.fold_in(rng, round_) if round_ else rng


def make_episode_sampler(model_cfg: ModelConfig, rl: RlSpec, inputs: RlInputs) -> Callable:
    """`(state, params, records, *, sharding, round_) -> (device batch, scores on device, host
    metrics, host scores, repeated records)`, like `sample_and_score` but each sample is a
    multi-turn episode with `config.rl.environment` (jalign.algorithms.episodes). The RNG
    is the single-turn sampler's, with each turn folded in."""
    env = make_environment(rl.episodes)
    runner = EpisodeRunner(model_cfg, inputs.tokenizer, env, rl.episodes,
                           temperature=rl.temperature)

    def play(state, params, records, *, sharding, round_=0):
        repeated = [r for r in records for _ in range(rl.group_size)]
        put = functools.partial(jax.make_array_from_process_local_data, sharding)
        played = runner.run(params, repeated, _rollout_rng(state.rng, state.step, round_),
                            put=put, fetch=local_rows)
        scores, metrics = score_episodes(played, repeated, inputs.reward)
        metrics = {**metrics, **played.metrics, "objective/scores": float(scores.mean())}
        host = dict(played.batch)
        if rl.algo == "ppo":  # GAE credits each turn's reward where the turn ends
            host["turn_rewards"] = turn_reward_tokens(host["loss_mask"], played.episodes)
        batch = {k: put(v) for k, v in host.items()}
        return batch, put(scores), metrics, scores, repeated
    return play


def _tied_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """[groups] bool: every completion of the group scored the same (no group signal)."""
    grouped = scores.reshape(-1, group_size)
    return grouped.max(1) <= grouped.min(1)


class _TieWatch:
    """Reports steps whose groups all tie: with zero advantages the step cannot learn."""

    def __init__(self):
        self.steps = 0

    def observe(self, step: int, scores: np.ndarray, tied: np.ndarray) -> None:
        if not tied.all():
            return
        if self.steps % _TIE_WARNING_EVERY == 0 and jax.process_index() == 0:
            print(f"warning: step {step + 1}: every group's completions scored the same "
                  f"(mean {float(scores.mean()):.3g}), so every advantage is 0 and this step "
                  "does not change the policy. A policy that never (or always) earns the "
                  "reward learns nothing from group-relative advantages: start from a model "
                  "that sometimes does (config.init_from = an SFT stage's final_params), shape "
                  "the reward, or set config.rl.dynamic_sampling=True.", flush=True)
        self.steps += 1


def _fill_with_signal(first, more: Callable, *, group_size: int, max_rounds: int, sharding):
    """DAPO's dynamic sampling over rounds of (device batch, host scores).

    `first` is the first round; `more(round)` samples another round of prompts.
    Groups that tie are dropped until this process has as many groups with signal as
    the first round had groups (or `max_rounds` extra rounds ran; then tied groups
    fill the rest). Returns (batch, scores on device, host scores, metrics).
    """
    rounds = [first]
    wanted = len(first[1]) // group_size
    kept = [(0, g) for g in np.flatnonzero(~_tied_groups(first[1], group_size))]
    while any_process(len(kept) < wanted) and len(rounds) <= max_rounds:
        batch, scores = more(len(rounds))
        kept += [(len(rounds), g) for g in np.flatnonzero(~_tied_groups(scores, group_size))]
        rounds.append((batch, scores))
    sampled = wanted * len(rounds)
    with_signal = len(kept)
    if len(kept) < wanted:  # fill with tied groups of the first rounds
        chosen = set(kept)
        kept += [(r, g) for r in range(len(rounds)) for g in range(wanted)
                 if (r, g) not in chosen][:wanted - len(kept)]
    kept = kept[:wanted]
    rows_per_round = wanted * group_size
    rows = np.asarray([r * rows_per_round + g * group_size + j for r, g in kept
                       for j in range(group_size)])
    host = {k: np.concatenate([local_rows(b[k]) for b, _ in rounds])[rows] for k in first[0]}
    scores = np.concatenate([s for _, s in rounds])[rows]
    put = lambda x: jax.make_array_from_process_local_data(sharding, x)  # noqa: E731
    metrics = {"dynamic_sampling/rounds": float(len(rounds)),
               "dynamic_sampling/frac_groups_dropped": 1.0 - min(with_signal, wanted) / sampled,
               "dynamic_sampling/groups_filled_with_ties": float(max(wanted - with_signal, 0))}
    return {k: put(v) for k, v in host.items()}, put(scores), scores, metrics


def make_rollout(config, model_cfg: ModelConfig, rl: RlSpec, inputs: RlInputs, *,
                  policy: Callable = lambda params: params) -> Callable:
    """`(state, prompt batch, *, step, next_batch) -> (device batch, scores, host scores,
    metrics)`:
    sampled and scored completions of the policy (`policy(state.params)`), with dynamic
    sampling when configured."""
    ties = _TieWatch()
    if rl.episodes is not None:
        play = make_episode_sampler(model_cfg, rl, inputs)

        def sample(state, prompt_batch, round_, sharding):
            records = [inputs.records[int(i)] for i in prompt_batch["prompt_index"]]
            return play(state, policy(state.params), records, sharding=sharding, round_=round_)
    else:
        sampler = make_sampler(model_cfg, inputs.tokenizer, max_new_tokens=rl.max_new_tokens,
                               temperature=rl.temperature)

        def sample(state, prompt_batch, round_, sharding):
            records = [inputs.records[int(i)] for i in prompt_batch["prompt_index"]]
            return sample_and_score(state, policy(state.params), records, sampler=sampler,
                                    tokenizer=inputs.tokenizer, reward=inputs.reward,
                                    group_size=rl.group_size, sharding=sharding, round_=round_)

    def rollout(state, prompt_batch, *, step: int, next_batch: Callable):
        sharding = batch_sharding(config, state.params)
        batch, scores, metrics, host_scores, _ = sample(state, prompt_batch, 0, sharding)
        tied = _tied_groups(host_scores, rl.group_size)
        if rl.group_size > 1:  # groups of one always "tie"
            metrics["frac_reward_zero_std"] = float(tied.mean())
        if rl.dynamic_sampling:
            def more(round_):
                out = sample(state, next_batch(), round_, sharding)
                return out[0], out[3]
            batch, scores, host_scores, extra = _fill_with_signal(
                (batch, host_scores), more, group_size=rl.group_size,
                max_rounds=rl.dynamic_sampling_max_rounds, sharding=sharding)
            metrics.update(extra)
            tied = _tied_groups(host_scores, rl.group_size)
        if rl.algo != "ppo" and rl.group_size > 1:  # a critic gives tied groups advantages
            ties.observe(step, host_scores, tied)
        return batch, scores, host_scores, metrics
    return rollout
