"""Online RL on prompts: GRPO family, RLOO, online (iterative) DPO.

Each training step first runs a rollout (outside the pure step): sample
`group_size` completions per prompt from the current policy, score them with the
reward sources, and turn them into a training batch; then the pure step updates
the policy. Sampling, reference log-probs, values and advantages run on the
devices, split over the batch like the training batch; only the completion
tokens visit the host (for text rewards), and one score per sequence comes back.
The rollout's randomness comes from the train state's step RNG, so a resumed run
samples the same completions.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from jalign import sharding as shd
from jalign.algorithms.common import (AlgorithmSetup, check_vocab, load_start_params,
                                      load_tokenizer, summarize_run, task_evaluator)
from jalign.algorithms.rl_spec import RlSpec
from jalign.checkpoint import load_params
from jalign.data.sft import tokenize_prompt_completion
from jalign.generate import decode_completions, generate, left_pad
from jalign.losses.rl import (gae_advantages, group_advantages, kl_estimate, rloo_advantages,
                              whiten)
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn, sequence_scores, token_values
from jalign.models.transformer import decoder_init_fn
from jalign.steps.common import decoder_logprob_fn, shifted_logprobs
from jalign.steps.preference import make_dpo_step
from jalign.steps.rl import decoder_value_fn, make_policy_gradient_step, make_ppo_step
from jalign.tasks import get_task


def make_reward_fn(config, spec: RlSpec, model_cfg: ModelConfig, tokenizer, task) -> Callable:
    """Combined reward: weighted gold reward, reward model and user callables.

    `spec.reward_sources` (config.rl.reward_sources) are "gold", "model" (the reward
    model saved at config.rl.reward_model) and "python:module.function" (a batched
    callable (prompts, completions) -> floats); `spec.reward_weights` the weights.
    """
    fns = []
    for source in spec.reward_sources:
        if source == "gold":
            if task is None:
                raise ValueError("reward source 'gold' needs a built-in task (config.data.source='task')")
            fns.append(task.gold_reward)
        elif source == "model":
            fns.append(_reward_model_fn(config, spec, model_cfg, tokenizer))
        elif source.startswith("python:"):
            module, _, name = source[len("python:"):].rpartition(".")
            fns.append(getattr(importlib.import_module(module), name))
        else:
            raise ValueError(f"unknown reward source {source!r}; valid: 'gold', 'model', "
                             "'python:module.function'")

    def reward(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        total = np.zeros(len(prompts), np.float32)
        for w, fn in zip(spec.reward_weights, fns):
            total += w * np.asarray(fn(prompts, completions), np.float32)
        return total
    return reward


def _reward_model_fn(config, spec: RlSpec, model_cfg, tokenizer):
    """Serves a trained reward model (config.rl.reward_model) as a batched text -> score function."""
    if not spec.reward_model:
        raise ValueError("reward source 'model' needs config.rl.reward_model (a reward stage's "
                         "WORKDIR/final_params)")
    abstract = nn.meta.unbox(jax.eval_shape(scalar_model_init_fn(model_cfg), jax.random.PRNGKey(0)))
    params = load_params(spec.reward_model, abstract)
    score = jax.jit(lambda p, b: sequence_scores(p, model_cfg, b, b["tokens"].shape[0]))

    def fn(prompts, completions):
        rows = [tokenize_prompt_completion(p, c, tokenizer, max_length=config.data.max_length)
                ["tokens"] for p, c in zip(prompts, completions)]
        width = -(-max(len(r) for r in rows) // 16) * 16
        tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
        seq = np.full((len(rows), width), -1, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
            seq[i, :len(r)] = i
        batch = {"tokens": tokens, "segment_ids": (seq >= 0).astype(np.int32),
                 "positions": np.tile(np.arange(width, dtype=np.int32), (len(rows), 1)),
                 "sequence_index": seq}
        return np.asarray(score(params, batch))
    return fn


def _prompt_dataset(prompts: list[str], batch_size: int, seed: int):
    def dataset(process_index, process_count):
        if batch_size % process_count:
            raise ValueError(f"config.data.batch_size ({batch_size}) must be divisible by the "
                             f"number of processes ({process_count})")
        ds = grain.MapDataset.source(prompts)[process_index::process_count]
        return ds.shuffle(seed=seed).repeat().batch(batch_size // process_count).to_iter_dataset()
    return dataset


# Folded into the step RNG for sampling (the steps' minibatch shuffle uses 29).
_ROLLOUT_STREAM = 17


def _batch_sharding(config, params):
    """The loop's batch sharding (mesh read off the params, rules from the config)."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return shd.data_sharding(mesh, shd.rules_from_config(config.get("logical_axis_rules")))


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, one copy each (an explicit transfer)."""
    shards = {}
    for shard in x.addressable_shards:
        shards.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate(jax.device_get([shards[k] for k in sorted(shards)]))


def make_sampler(model_cfg: ModelConfig, tokenizer, *, max_new_tokens: int, temperature: float):
    """Jitted `(params, rng, step, prompt_BxP, mask_BxP) -> (batch, completion_BxN, mask_BxN)`.

    Everything stays on device, split over the batch like the prompts. The batch
    is in the rollout layout (tokens, segment_ids, loss_mask, positions [B, P+N])
    and carries the sampler's behaviour log-probs as `old_logps` [B, P+N-1], aligned
    like shifted_logprobs (no second forward pass; at temperature 1 they equal the
    trainer's). The sampling RNG is derived from the state's (rng, step).
    """
    def sample(params, rng, step, prompt_BxP, mask_BxP):
        rng = jax.random.fold_in(jax.random.fold_in(rng, step), _ROLLOUT_STREAM)
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
    return jax.jit(sample)


def sample_and_score(state, params, prompts: Sequence[str], *, sampler, tokenizer, reward_fn,
                     group_size: int, sharding):
    """Samples `group_size` completions per prompt from `params` and scores them.

    The prompts (token ids) go to the devices split over the batch; the only
    arrays that come back to the host are the completion tokens and their mask,
    for the reward function (text in, one float per sequence out), whose scores
    return split like the batch. Returns (device batch, scores_B on device,
    host metrics, the scores on the host).
    """
    repeated = [p for p in prompts for _ in range(group_size)]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    encoded = [bos + tokenizer.encode(p) for p in repeated]
    prompt, mask = left_pad(encoded, tokenizer.pad_id, -(-max(len(e) for e in encoded) // 16) * 16)
    put = functools.partial(jax.make_array_from_process_local_data, sharding)
    batch, completion, completion_mask = sampler(params, state.rng, state.step, put(prompt), put(mask))
    completion, completion_mask = _local_rows(completion), _local_rows(completion_mask)
    texts = decode_completions(tokenizer, completion, completion_mask)
    scores = np.asarray(reward_fn(repeated, texts), np.float32)
    metrics = {"objective/scores": float(scores.mean()),
               "completions/mean_length": float(completion_mask.sum(-1).mean())}
    return batch, put(scores), metrics, scores


def _policy_gradient_batch_fn(model_cfg: ModelConfig, rl: RlSpec):
    """Jitted (reference params, batch, scores_B) -> (batch with advantages, metrics)."""
    def finish(reference, batch, scores_B):
        metrics = {}
        rewards = scores_B
        if rl.kl_beta > 0:
            ref_logps = shifted_logprobs(reference, model_cfg, batch)[0]
            if rl.algo == "rloo":  # RLOO folds a k1 KL penalty into the sequence reward
                kl = ((batch["old_logps"] - ref_logps) * batch["loss_mask"][:, 1:]).sum(-1)
                metrics["objective/kl"] = kl.mean()
                rewards = rewards - rl.kl_beta * kl
            else:
                batch = dict(batch, ref_logps=ref_logps)
        if rl.algo == "rloo":
            advantages = rloo_advantages(rewards, rl.group_size)
        else:
            advantages = group_advantages(rewards, rl.group_size, scale=rl.scale_rewards)
        metrics["objective/rlhf_reward"] = rewards.mean()
        return dict(batch, advantages=advantages), metrics
    return jax.jit(finish)


def _rl_inputs(config, spec: RlSpec, model_cfg: ModelConfig):
    """(tokenizer, task, training prompts, reward function) of an online-RL run."""
    if config.data.source != "task":
        raise ValueError(f"config.algo={config.algo!r} samples prompts from a built-in task; set "
                         "config.data.source='task'")
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
    task = get_task(config.data.task)
    prompts = task.prompts(config.data.num_train_examples, seed=config.seed)
    return tokenizer, task, prompts, make_reward_fn(config, spec, model_cfg, tokenizer, task)


def _setup(config, model_cfg: ModelConfig, rl: RlSpec, inputs=None) -> AlgorithmSetup:
    tokenizer, task, prompts, reward_fn = inputs or _rl_inputs(config, rl, model_cfg)
    online_dpo = rl.preference is not None
    sampler = make_sampler(model_cfg, tokenizer, max_new_tokens=rl.max_new_tokens,
                           temperature=rl.temperature)
    finish = _policy_gradient_batch_fn(model_cfg, rl)

    def rollout(state, prompt_batch):
        batch, scores, metrics, host_scores = sample_and_score(
            state, state.params, [str(p) for p in prompt_batch], sampler=sampler, tokenizer=tokenizer,
            reward_fn=reward_fn, group_size=rl.group_size,
            sharding=_batch_sharding(config, state.params))
        if online_dpo:
            host_batch = {k: _local_rows(v) for k, v in batch.items() if k != "old_logps"}
            return _preference_batch(host_batch, host_scores, rl.group_size), metrics
        batch, device_metrics = finish(state.frozen["reference"] if rl.kl_beta > 0 else None,
                                       batch, scores)
        return batch, {**metrics, **{k: float(v) for k, v in jax.device_get(device_metrics).items()}}

    return AlgorithmSetup(dataset=_prompt_dataset(prompts, config.data.batch_size, config.seed),
                          load_params=load_start_params(config),
                          with_reference=rl.uses_reference,
                          evaluate=task_evaluator(config, model_cfg, tokenizer, task),
                          summarize=summarize_run(config.algo), rollout=rollout)


def _preference_batch(batch, rewards, group):
    """Best vs worst completion of each prompt's group, in the preference-batch layout."""
    grouped = rewards.reshape(-1, group)
    best = grouped.argmax(1) + np.arange(grouped.shape[0]) * group
    worst = grouped.argmin(1) + np.arange(grouped.shape[0]) * group
    rows = np.stack([best, worst], 1).reshape(-1)
    out = {k: v[rows] for k, v in batch.items()}
    n = grouped.shape[0]
    valid = (grouped.max(1) > grouped.min(1)).astype(np.float32)  # ties teach nothing
    seq = np.where(out["segment_ids"] > 0, np.arange(2 * n, dtype=np.int32)[:, None], -1)
    out.update(sequence_index=seq.astype(np.int32), pair_mask=valid,
               example_index=np.arange(n, dtype=np.int32))
    return out


def grpo_setup(config, model_cfg, spec: RlSpec, workdir):
    del workdir
    return _setup(config, model_cfg, spec)


def grpo_step(config, model_cfg, spec: RlSpec, optimizer):
    return make_policy_gradient_step(
        decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl), optimizer,
        loss_kwargs=spec.policy_loss, num_iterations=spec.num_iterations,
        num_minibatches=spec.num_minibatches)


def online_dpo_step(config, model_cfg, spec: RlSpec, optimizer):
    return make_dpo_step(decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl),
                         optimizer, loss_fn=spec.preference.loss_fn,
                         reference=spec.preference.reference)


# --------------------------------------------------------------------- PPO with a critic

def _ppo_batch_fn(model_cfg: ModelConfig, rl: RlSpec):
    """Jitted (params, frozen, batch, scores_B) -> (PPO batch, metrics), all on device.

    Adds the critic's `old_values`, GAE `advantages` (whitened) and `returns` from
    per-token rewards -kl_coef * KL_t plus the score on the last completion token,
    and each sequence's KL to the reference `kl`.
    """
    def finish(params, frozen, batch, scores_B):
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        ref_logps = shifted_logprobs(frozen["reference"], model_cfg, batch)[0]
        old_values = token_values(params["critic"], model_cfg, batch)[:, :-1]
        kl_t = kl_estimate(batch["old_logps"], ref_logps, estimator=rl.kl_estimator) * mask
        coef = frozen["kl_coef"]
        steps = mask.shape[1]
        last = steps - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # last completion token
        is_last = (jnp.arange(steps)[None, :] == last[:, None]).astype(jnp.float32)
        rewards_t = -coef * kl_t + is_last * scores_B[:, None]
        adv, returns = gae_advantages(rewards_t, old_values, mask, gamma=rl.gamma, lam=rl.lam)
        seq_kl = kl_t.sum(-1)
        batch = dict(batch, old_values=old_values * mask, advantages=whiten(adv, mask),
                     returns=returns, kl=seq_kl)
        metrics = {"objective/kl": seq_kl.mean(), "objective/non_score_reward": -coef * seq_kl.mean(),
                   "objective/rlhf_reward": (scores_B - coef * seq_kl).mean()}
        return batch, metrics
    return jax.jit(finish)


def ppo_setup(config, model_cfg: ModelConfig, rl: RlSpec, workdir: str) -> AlgorithmSetup:
    """PPO: policy + separate critic (a scalar model, from the reward model if given)."""
    del workdir
    inputs = _rl_inputs(config, rl, model_cfg)  # one reward function (and reward model) for both
    base = _setup(config, model_cfg, rl, inputs=inputs)
    tokenizer, reward_fn = inputs[0], inputs[3]
    sampler = make_sampler(model_cfg, tokenizer, max_new_tokens=rl.max_new_tokens,
                           temperature=rl.temperature)
    finish = _ppo_batch_fn(model_cfg, rl)

    def params_init(rng):
        p_rng, c_rng = jax.random.split(rng)
        return {"policy": decoder_init_fn(model_cfg)(p_rng), "critic": scalar_model_init_fn(model_cfg)(c_rng)}

    def load(abstract):
        policy = load_params(config.init_from, abstract["policy"]) if config.init_from else None
        if rl.critic_init:
            critic = load_params(rl.critic_init, abstract["critic"])
        elif config.init_from:
            critic = {"decoder": load_params(config.init_from, abstract["critic"]["decoder"])}
        else:
            critic = None
        return {"policy": policy, "critic": critic}

    def rollout(state, prompt_batch):
        """Sampling, reference log-probs, values and advantages stay on device, batch-split."""
        batch, scores, metrics, _ = sample_and_score(
            state, state.params["policy"], [str(p) for p in prompt_batch], sampler=sampler,
            tokenizer=tokenizer, reward_fn=reward_fn, group_size=rl.group_size,
            sharding=_batch_sharding(config, state.params))
        batch, device_metrics = finish(state.params, state.frozen, batch, scores)
        return batch, {**metrics, **{k: float(v) for k, v in jax.device_get(device_metrics).items()}}

    base.params_init_fn = params_init
    base.load_params = load if (config.init_from or rl.critic_init) else None
    base.with_reference = "policy"
    base.frozen_extra = {"kl_coef": jnp.float32(rl.kl_coef)}
    base.rollout = rollout
    evaluate = base.evaluate
    base.evaluate = (lambda params, start: evaluate(params["policy"], start and start["policy"])) \
        if evaluate else None
    return base


def ppo_step(config, model_cfg, rl: RlSpec, optimizer):
    return make_ppo_step(
        decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl, with_stats=True),
        decoder_value_fn(model_cfg), optimizer, clip_eps=rl.policy_loss["clip_eps_low"],
        value_clip=rl.value_clip, vf_coef=rl.vf_coef, entropy_coef=rl.entropy_coef,
        num_iterations=rl.num_iterations, num_minibatches=rl.num_minibatches,
        kl_target=rl.kl_target, kl_horizon=rl.kl_horizon)
