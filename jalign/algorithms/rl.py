"""Online RL on prompts: GRPO family, RLOO, online (iterative) DPO, PPO.

Prompts come from a built-in task or from the user's JSONL / Parquet files
(`config.data.source`), each row with any other columns ("answer", "tests", ...)
that travel to the reward functions (jalign.algorithms.reward_sources). Each
training step first runs a rollout outside the pure step: sample `group_size`
completions per prompt from the current policy, score them, and turn them into a
training batch; then the pure step updates the policy. Sampling, reference
log-probs, values and advantages run on the devices, split over the batch like the
training batch (jalign.algorithms.rollout).

Dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476), `config.rl.dynamic_sampling`:
groups whose completions all scored the same carry no group-relative signal; they
are dropped and more prompts are sampled, up to `dynamic_sampling_max_rounds` extra
rounds, until the batch is full (any shortfall is filled with tied groups and
counted). A step whose groups are all tied is reported with its cause.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms.common import AlgorithmSetup, load_start_params, summarize_run
from jalign.algorithms.rl_inputs import RlInputs, prompt_dataset, rl_evaluator, rl_inputs
from jalign.algorithms.rl_spec import RlSpec
from jalign.algorithms.rollout import local_rows, make_rollout
from jalign.checkpoint import load_params
from jalign.losses.rl import (gae_advantages, group_advantages, kl_estimate, rloo_advantages,
                              whiten)
from jalign.models import pretrained
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn, token_values
from jalign.models.transformer import decoder_init_fn
from jalign.steps.common import decoder_logprob_fn, shifted_logprobs
from jalign.steps.preference import make_dpo_step
from jalign.steps.rl import decoder_value_fn, make_policy_gradient_step, make_ppo_step


def _policy_gradient_batch_fn(model_cfg: ModelConfig, rl: RlSpec):
    """Jitted (reference params, batch, scores_B) -> (batch with advantages, metrics)."""
    def finish(reference, batch, scores_B):
        metrics = {}
        rewards = scores_B
        if rl.kl_beta > 0:
            ref_logps = shifted_logprobs(reference, model_cfg, batch,
                                         temperature=rl.temperature)[0]
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


def _setup(config, model_cfg: ModelConfig, rl: RlSpec, inputs: RlInputs) -> AlgorithmSetup:
    """GRPO / RLOO / online DPO: rollouts become policy-gradient or preference batches."""
    sample = make_rollout(config, model_cfg, rl, inputs)
    finish = _policy_gradient_batch_fn(model_cfg, rl)

    def rollout(state, prompt_batch, *, step: int, next_batch: Callable):
        batch, scores, host_scores, metrics = sample(state, prompt_batch, step=step,
                                                     next_batch=next_batch)
        if rl.preference is not None:  # online DPO: best vs worst of each group
            host_batch = {k: local_rows(v) for k, v in batch.items() if k != "old_logps"}
            return _preference_batch(host_batch, host_scores, rl.group_size), metrics
        batch, device_metrics = finish(state.frozen["reference"] if rl.kl_beta > 0 else None,
                                       batch, scores)
        return batch, {**metrics, **{k: float(v) for k, v in jax.device_get(device_metrics).items()}}

    return AlgorithmSetup(dataset=prompt_dataset(config, inputs.records),
                          load_params=load_start_params(config),
                          with_reference=rl.uses_reference,
                          evaluate=rl_evaluator(config, model_cfg, rl, inputs),
                          summarize=summarize_run(config.algo, skip_report=inputs.skip_report,
                                                  truncation_report=inputs.truncation_report),
                          rollout=rollout)


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
    return _setup(config, model_cfg, spec, rl_inputs(config, spec, model_cfg))


def grpo_step(config, model_cfg, spec: RlSpec, optimizer):
    return make_policy_gradient_step(
        decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl,
                           temperature=spec.temperature), optimizer,
        loss_kwargs=spec.policy_loss, num_iterations=spec.num_iterations,
        num_minibatches=spec.num_minibatches)


def online_dpo_step(config, model_cfg, spec: RlSpec, optimizer):
    return make_dpo_step(decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl,
                                            temperature=spec.temperature),
                         optimizer, loss_fn=spec.preference.loss_fn,
                         reference=spec.preference.reference)


# --------------------------------------------------------------------- PPO with a critic

def token_rewards(kl_t, mask, scores_B, kl_coef, turn_rewards=None):
    """PPO's per-token rewards [B, T-1]: -kl_coef * KL_t, plus each sequence's score on its
    last completion token; with `turn_rewards` (multi-turn episodes: each environment
    reward on its turn's last token, part of the score), those stay where their turns end
    and the last token gets the rest, so a sequence's rewards still sum to its score."""
    steps = mask.shape[1]
    last = steps - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # last completion token
    is_last = (jnp.arange(steps)[None, :] == last[:, None]).astype(jnp.float32)
    rewards_t = -kl_coef * kl_t + is_last * scores_B[:, None]
    if turn_rewards is not None:
        turn_t = turn_rewards * mask
        rewards_t = rewards_t + turn_t - is_last * turn_t.sum(-1, keepdims=True)
    return rewards_t


def _ppo_batch_fn(model_cfg: ModelConfig, rl: RlSpec):
    """Jitted (params, frozen, batch, scores_B) -> (PPO batch, metrics), all on device.

    Adds the critic's `old_values`, GAE `advantages` (whitened) and `returns` from
    per-token rewards -kl_coef * KL_t plus the score on the last completion token (for
    multi-turn episodes, each per-turn environment reward on its turn's last token,
    `turn_rewards`, and the rest of the score on the last), and each sequence's KL to
    the reference `kl`.
    """
    def finish(params, frozen, batch, scores_B):
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        ref_logps = shifted_logprobs(frozen["reference"], model_cfg, batch,
                                     temperature=rl.temperature)[0]
        old_values = token_values(params["critic"], model_cfg, batch)[:, :-1]
        kl_t = kl_estimate(batch["old_logps"], ref_logps, estimator=rl.kl_estimator) * mask
        coef = frozen["kl_coef"]
        rewards_t = token_rewards(kl_t, mask, scores_B, coef, batch.get("turn_rewards"))
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
    inputs = rl_inputs(config, rl, model_cfg)
    sample = make_rollout(config, model_cfg, rl, inputs, policy=lambda params: params["policy"])
    finish = _ppo_batch_fn(model_cfg, rl)
    evaluate = rl_evaluator(config, model_cfg, rl, inputs)

    def params_init(rng):
        p_rng, c_rng = jax.random.split(rng)
        return {"policy": decoder_init_fn(model_cfg)(p_rng), "critic": scalar_model_init_fn(model_cfg)(c_rng)}

    start = pretrained.find(config.init_from) if config.init_from else None

    def load(abstract):
        policy = start.load(abstract["policy"]) if start else None
        if rl.critic_init:
            critic = load_params(rl.critic_init, abstract["critic"])
        elif start:
            critic = {"decoder": start.load(abstract["critic"]["decoder"])}
        else:
            critic = None
        return {"policy": policy, "critic": critic}

    def rollout(state, prompt_batch, *, step: int, next_batch: Callable):
        """Sampling, reference log-probs, values and advantages stay on device, batch-split."""
        batch, scores, _, metrics = sample(state, prompt_batch, step=step, next_batch=next_batch)
        batch, device_metrics = finish(state.params, state.frozen, batch, scores)
        return batch, {**metrics, **{k: float(v) for k, v in jax.device_get(device_metrics).items()}}

    return AlgorithmSetup(
        dataset=prompt_dataset(config, inputs.records), params_init_fn=params_init,
        load_params=load if (config.init_from or rl.critic_init) else None,
        with_reference="policy", frozen_extra={"kl_coef": jnp.float32(rl.kl_coef)},
        evaluate=(lambda params, start: evaluate(params["policy"], start and start["policy"]))
        if evaluate else None,
        summarize=summarize_run(config.algo, skip_report=inputs.skip_report,
                                truncation_report=inputs.truncation_report), rollout=rollout)


def ppo_step(config, model_cfg, rl: RlSpec, optimizer):
    return make_ppo_step(
        decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl, with_stats=True,
                           temperature=rl.temperature),
        decoder_value_fn(model_cfg), optimizer, clip_eps=rl.policy_loss["clip_eps_low"],
        dual_clip=rl.policy_loss["dual_clip"],
        value_clip=rl.value_clip, vf_coef=rl.vf_coef, entropy_coef=rl.entropy_coef,
        num_iterations=rl.num_iterations, num_minibatches=rl.num_minibatches,
        kl_target=rl.kl_target, kl_horizon=rl.kl_horizon)
