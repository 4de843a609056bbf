"""Online RL on prompts: GRPO family, RLOO, online (iterative) DPO.

Each training step first runs a rollout (outside the pure step): sample
`group_size` completions per prompt from the current policy, score them with the
reward sources, and turn them into a training batch; then the pure step updates
the policy. The rollout's randomness comes from the train state's step RNG, so a
resumed run samples the same completions.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import grain
import jax
import numpy as np

from jalign import losses
from jalign.algorithms.common import (AlgorithmSetup, check_vocab, load_start_params,
                                      load_tokenizer, summarize_run, task_evaluator)
from jalign.generate import decode_completions, generate, left_pad
from jalign.losses.rl import group_advantages, rloo_advantages
from jalign.models.config import ModelConfig
from jalign.steps.common import shifted_logprobs
from jalign.steps.preference import make_dpo_step
from jalign.steps.rl import make_policy_gradient_step


def make_reward_fn(config, model_cfg: ModelConfig, tokenizer, task) -> Callable:
    """Combined reward: weighted gold reward, reward model and user callables.

    `config.rl.reward_sources` is a comma list of "gold", "model" (the reward model
    saved at config.rl.reward_model) and "python:module.function" (a batched
    callable (prompts, completions) -> floats); `config.rl.reward_weights` the weights.
    """
    sources = [s.strip() for s in config.rl.reward_sources.split(",") if s.strip()]
    weights = list(config.rl.reward_weights or [1.0] * len(sources))
    if len(weights) != len(sources):
        raise ValueError(f"config.rl.reward_weights has {len(weights)} entries for "
                         f"{len(sources)} reward sources {sources}")
    fns = []
    for source in sources:
        if source == "gold":
            if task is None:
                raise ValueError("reward source 'gold' needs a built-in task (config.data.source='task')")
            fns.append(task.gold_reward)
        elif source == "model":
            fns.append(_reward_model_fn(config, model_cfg, tokenizer))
        elif source.startswith("python:"):
            import importlib
            module, _, name = source[len("python:"):].rpartition(".")
            fns.append(getattr(importlib.import_module(module), name))
        else:
            raise ValueError(f"unknown reward source {source!r}; valid: 'gold', 'model', "
                             "'python:module.function'")

    def reward(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        total = np.zeros(len(prompts), np.float32)
        for w, fn in zip(weights, fns):
            total += w * np.asarray(fn(prompts, completions), np.float32)
        return total
    return reward


def _reward_model_fn(config, model_cfg, tokenizer):
    """Serves a trained reward model (config.rl.reward_model) as a batched text -> score function."""
    from jalign.checkpoint import load_params
    from jalign.data.sft import tokenize_prompt_completion
    from jalign.models.heads import scalar_model_init_fn, sequence_scores
    import flax.linen as nn

    if not config.rl.reward_model:
        raise ValueError("reward source 'model' needs config.rl.reward_model (a reward stage's "
                         "WORKDIR/final_params)")
    abstract = nn.meta.unbox(jax.eval_shape(scalar_model_init_fn(model_cfg), jax.random.PRNGKey(0)))
    params = load_params(config.rl.reward_model, abstract)
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


@functools.partial(jax.jit, static_argnums=(1,))
def _token_logps(params, config, batch):
    return shifted_logprobs(params, config, batch)[0]


def sample_groups(params, model_cfg, tokenizer, prompts: Sequence[str], group_size: int, rng, *,
                  max_new_tokens: int, temperature: float):
    """Samples `group_size` completions per prompt; returns a batch dict and the texts.

    The batch carries the sampler's behaviour log-probs as `old_logps` (no second
    forward pass); with temperature 1 they equal the trainer's log-probs.
    """
    repeated = [p for p in prompts for _ in range(group_size)]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    encoded = [bos + tokenizer.encode(p) for p in repeated]
    width = -(-max(len(e) for e in encoded) // 16) * 16
    prompt, mask = left_pad(encoded, tokenizer.pad_id, width)
    tokens, comp_mask, logps = jax.device_get(generate(
        params, model_cfg, prompt, mask, rng, max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, greedy=False, temperature=temperature))
    segments = np.concatenate([mask, comp_mask], 1)
    # Behaviour log-probs aligned like shifted_logprobs: position t scores token t + 1.
    old_logps = np.zeros((tokens.shape[0], tokens.shape[1] - 1), np.float32)
    old_logps[:, width - 1:] = logps
    batch = {"tokens": tokens, "segment_ids": segments,
             "loss_mask": np.concatenate([np.zeros_like(mask), comp_mask], 1),
             "positions": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32),
             "old_logps": old_logps}
    texts = decode_completions(tokenizer, tokens[:, width:], comp_mask)
    return batch, repeated, texts


def _rl_inputs(config, model_cfg: ModelConfig):
    """(tokenizer, task, training prompts, reward function) of an online-RL run."""
    from jalign.tasks import get_task
    if config.data.source != "task":
        raise ValueError(f"config.algo={config.algo!r} samples prompts from a built-in task; set "
                         "config.data.source='task'")
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
    task = get_task(config.data.task)
    prompts = task.prompts(config.data.num_train_examples, seed=config.seed)
    return tokenizer, task, prompts, make_reward_fn(config, model_cfg, tokenizer, task)


def _setup(config, model_cfg: ModelConfig, workdir: str, *, online_dpo: bool,
           inputs=None) -> AlgorithmSetup:
    tokenizer, task, prompts, reward_fn = inputs or _rl_inputs(config, model_cfg)
    rl = config.rl
    group = rl.group_size

    def rollout(state, prompt_batch):
        rng = jax.random.fold_in(state.step_rng(), 17)
        batch, repeated, texts = sample_groups(
            state.params, model_cfg, tokenizer, [str(p) for p in prompt_batch], group, rng,
            max_new_tokens=rl.max_new_tokens, temperature=rl.temperature)
        rewards = reward_fn(repeated, texts)
        lengths = batch["loss_mask"].sum(-1)
        metrics = {"objective/scores": float(rewards.mean()),
                   "completions/mean_length": float(lengths.mean())}
        if online_dpo:
            return _preference_batch(batch, rewards, group), metrics
        if rl.kl_beta > 0:
            batch["ref_logps"] = np.asarray(_token_logps(state.frozen["reference"], model_cfg, batch))
        if config.algo == "rloo":
            if rl.kl_beta > 0:  # RLOO folds a k1 KL penalty into the sequence reward
                mask = batch["loss_mask"][:, 1:]
                kl = ((batch["old_logps"] - batch.pop("ref_logps")) * mask).sum(-1)
                metrics["objective/kl"] = float(kl.mean())
                rewards = rewards - rl.kl_beta * kl
            advantages = rloo_advantages(rewards, group)
        else:
            advantages = group_advantages(rewards, group, scale=rl.scale_rewards)
        batch["advantages"] = np.asarray(advantages)
        metrics["objective/rlhf_reward"] = float(rewards.mean())
        return batch, metrics

    return AlgorithmSetup(tokenizer=tokenizer,
                          dataset=_prompt_dataset(prompts, config.data.batch_size, config.seed),
                          load_params=load_start_params(config),
                          with_reference=online_dpo or rl.kl_beta > 0,
                          evaluate=task_evaluator(config, model_cfg, tokenizer, task),
                          summarize=summarize_run(config.algo), rollout=rollout)


def _preference_batch(batch, rewards, group):
    """Best vs worst completion of each prompt's group, in the preference-batch layout."""
    grouped = rewards.reshape(-1, group)
    best = grouped.argmax(1) + np.arange(grouped.shape[0]) * group
    worst = grouped.argmin(1) + np.arange(grouped.shape[0]) * group
    rows = np.stack([best, worst], 1).reshape(-1)
    out = {k: v[rows] for k, v in batch.items() if k != "old_logps"}
    n = grouped.shape[0]
    valid = (grouped.max(1) > grouped.min(1)).astype(np.float32)  # ties teach nothing
    seq = np.where(out["segment_ids"] > 0, np.arange(2 * n, dtype=np.int32)[:, None], -1)
    out.update(sequence_index=seq.astype(np.int32), pair_mask=valid,
               example_index=np.arange(n, dtype=np.int32))
    return out


def grpo_setup(config, model_cfg, workdir):
    return _setup(config, model_cfg, workdir, online_dpo=False)


def online_dpo_setup(config, model_cfg, workdir):
    return _setup(config, model_cfg, workdir, online_dpo=True)


def grpo_step(config, model_cfg, optimizer, schedule, setup):
    rl = config.rl
    loss_kwargs = dict(clip_eps_low=rl.clip_eps_low, clip_eps_high=rl.clip_eps_high,
                       loss_aggregation=rl.loss_aggregation,
                       kl_beta=0.0 if config.algo == "rloo" else rl.kl_beta,
                       kl_estimator=rl.kl_estimator, max_completion_length=rl.max_new_tokens,
                       sequence_level_ratio=config.algo == "rloo")
    return make_policy_gradient_step(model_cfg, optimizer, loss_kwargs=loss_kwargs,
                                     num_iterations=rl.num_iterations, schedule=schedule,
                                     logprob_impl=config.train.logprob_impl)


def online_dpo_step(config, model_cfg, optimizer, schedule, setup):
    loss_fn = functools.partial(losses.dpo_loss, loss_type=config.dpo.loss_type, beta=config.dpo.beta)
    return make_dpo_step(model_cfg, optimizer, loss_fn=loss_fn, reference="params",
                         schedule=schedule, logprob_impl=config.train.logprob_impl)



# --------------------------------------------------------------------- PPO with a critic

@functools.partial(jax.jit, static_argnums=(1,))
def _token_values(params, config, batch):
    from jalign.models.heads import token_values
    return token_values(params, config, batch)[:, :-1]


def ppo_setup(config, model_cfg: ModelConfig, workdir: str) -> AlgorithmSetup:
    """PPO: policy + separate critic (a scalar model, from the reward model if given)."""
    from jax import numpy as jnp
    from jalign.checkpoint import load_params
    from jalign.losses.rl import gae_advantages, kl_estimate, whiten
    from jalign.models.heads import scalar_model_init_fn
    from jalign.train import decoder_init_fn

    inputs = _rl_inputs(config, model_cfg)  # one reward function (and reward model) for both
    base = _setup(config, model_cfg, workdir, online_dpo=False, inputs=inputs)
    rl = config.rl
    task_reward = inputs[3]

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
        rng = jax.random.fold_in(state.step_rng(), 17)
        policy, critic = state.params["policy"], state.params["critic"]
        batch, repeated, texts = sample_groups(
            policy, model_cfg, base.tokenizer, [str(p) for p in prompt_batch], rl.group_size, rng,
            max_new_tokens=rl.max_new_tokens, temperature=rl.temperature)
        scores = task_reward(repeated, texts)
        mask = batch["loss_mask"][:, 1:].astype(np.float32)
        old_logps = batch["old_logps"]
        ref_logps = np.asarray(_token_logps(state.frozen["reference"], model_cfg, batch))
        old_values = np.asarray(_token_values(critic, model_cfg, batch))
        kl_t = np.asarray(kl_estimate(old_logps, ref_logps, estimator=rl.kl_estimator)) * mask
        coef = float(state.frozen["kl_coef"])
        rewards_t = -coef * kl_t
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # last completion token
        rewards_t[np.arange(len(last)), last] += scores
        adv, returns = gae_advantages(jnp.asarray(rewards_t), jnp.asarray(old_values), jnp.asarray(mask),
                                      gamma=rl.gamma, lam=rl.lam)
        seq_kl = kl_t.sum(-1)
        batch.update(old_logps=old_logps, old_values=old_values * mask,
                     advantages=np.asarray(whiten(adv, jnp.asarray(mask))), returns=np.asarray(returns),
                     kl=seq_kl.astype(np.float32))
        metrics = {"objective/scores": float(scores.mean()), "objective/kl": float(seq_kl.mean()),
                   "objective/non_score_reward": float(-coef * seq_kl.mean()),
                   "objective/rlhf_reward": float((scores - coef * seq_kl).mean()),
                   "completions/mean_length": float(batch["loss_mask"].sum(-1).mean())}
        return batch, metrics

    base.params_init_fn = params_init
    base.load_params = load if (config.init_from or rl.critic_init) else None
    base.with_reference = "policy"
    base.frozen_extra = {"kl_coef": jnp.float32(rl.kl_coef)}
    base.rollout = rollout
    evaluate = base.evaluate
    base.evaluate = (lambda params, start: evaluate(params["policy"], start and start["policy"])) \
        if evaluate else None
    return base


def ppo_step(config, model_cfg, optimizer, schedule, setup):
    from jalign.steps.rl import make_ppo_step
    rl = config.rl
    return make_ppo_step(model_cfg, optimizer, clip_eps=rl.clip_eps_low, value_clip=rl.value_clip,
                         vf_coef=rl.vf_coef, entropy_coef=rl.entropy_coef,
                         num_iterations=rl.num_iterations, kl_target=rl.kl_target or None,
                         kl_horizon=rl.kl_horizon, schedule=schedule,
                         logprob_impl=config.train.logprob_impl)
