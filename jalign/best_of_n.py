"""Best-of-n sampling against any reward source, as an evaluation (and as a policy).

For each held-out prompt, n completions are sampled from the policy, a reward (a
proxy: a reward model, an ensemble, WARM, a verifier; `score_fn(indices, completions,
lengths)` as `jalign.evaluate.evaluate_policy` calls it, or an RL run's reward sources
through `jalign.algorithms.rl_inputs.best_of_n_evaluator`) scores them, and the
highest-scoring one is kept. The kept completion's gold reward against the analytical
KL of the best-of-n policy to the sampling policy,

    KL(pi_bon || pi) = log n - (n - 1) / n,

traces Gao et al.'s over-optimisation curve without training anything (the formula is
exact in the limit of a continuous reward distribution and an upper bound otherwise,
Beirami et al. 2024).

References: Stiennon et al., "Learning to summarize from human feedback",
arXiv:2009.01325 (appendix G.3); Gao, Schulman, Hilton, "Scaling Laws for Reward Model
Overoptimization", arXiv:2210.10760; Beirami et al., "Theoretical guarantees on the
best-of-n alignment policy", arXiv:2401.01879.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from jalign.evaluate import mean_and_sem
from jalign.generate import decode_completions, generate, left_pad


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || sampling policy) = log n - (n - 1) / n, in nats."""
    return math.log(n) - (n - 1) / n


def select_best(rewards_PxN) -> np.ndarray:
    """Index of the highest reward in each row (the first on ties; NaN = unscored, never
    chosen unless the whole row is NaN)."""
    rewards = np.asarray(rewards_PxN, np.float64)
    return np.argmax(np.where(np.isnan(rewards), -np.inf, rewards), axis=-1)


class BestOfN(NamedTuple):
    completions: list[list[str]]   # [P][n] sampled completions
    rewards: np.ndarray            # [P, n] the reward function's scores (NaN = None)
    chosen: np.ndarray             # [P] index of the kept completion

    @property
    def best(self) -> list[str]:
        return [c[i] for c, i in zip(self.completions, self.chosen)]


def sample_best_of_n(params, config, tokenizer, prompt_ids: Sequence[Sequence[int]],
                     score_fn: Callable, *, n: int, max_new_tokens: int, seed: int = 0,
                     temperature: float = 1.0, batch_size: int = 64) -> BestOfN:
    """n sampled completions per prompt (`prompt_ids`: token ids, BOS included), scored
    by `score_fn(indices, completions, lengths) -> scores` (the prompt index of each
    sample, its text, its length in tokens; NaN or None = unscored), the best kept."""
    prompts_per_batch = max(1, batch_size // n)
    rng = jax.random.PRNGKey(seed)
    completions, rewards = [], []
    for start in range(0, len(prompt_ids), prompts_per_batch):
        indices = list(range(start, min(start + prompts_per_batch, len(prompt_ids))))
        rows = [list(prompt_ids[i]) for i in indices for _ in range(n)]
        size = prompts_per_batch * n
        rows += [rows[-1]] * (size - len(rows))  # fixed shapes: one compile
        width = -(-max(len(r) for r in rows) // 16) * 16
        tokens, mask = left_pad(rows, tokenizer.pad_id, width)
        out = generate(params, config, tokens, mask, jax.random.fold_in(rng, start),
                       max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, temperature=temperature)
        count = len(indices) * n
        texts = decode_completions(tokenizer, out.tokens[:, width:], out.completion_mask)[:count]
        lengths = np.asarray(out.completion_mask).sum(-1)[:count]
        scores = score_fn([i for i in indices for _ in range(n)], texts, lengths)
        scores = np.asarray([np.nan if s is None else s for s in scores], np.float64)
        completions += [texts[j * n:(j + 1) * n] for j in range(len(indices))]
        rewards.append(scores.reshape(len(indices), n))
    rewards = np.concatenate(rewards)
    return BestOfN(completions, rewards, select_best(rewards))


def best_of_n_metrics(samples: BestOfN, prompts: Sequence[str],
                      gold_fn: Callable | None = None) -> dict[str, Any]:
    """best_of_n/n, best_of_n/kl (analytical), best_of_n/proxy_reward (the kept
    completions' reward) and, with `gold_fn(prompts, completions) -> scores` (e.g. a
    task's gold reward), best_of_n/gold_reward with its _sem over prompts and
    best_of_n/gold_reward_of_samples (every sample's: the n = 1 baseline)."""
    n = samples.rewards.shape[1]
    kept = samples.rewards[np.arange(len(samples.chosen)), samples.chosen]
    out = {"best_of_n/n": n, "best_of_n/kl": best_of_n_kl(n),
           "best_of_n/proxy_reward": float(np.nanmean(kept))}
    if gold_fn is not None:
        gold = np.asarray(gold_fn(list(prompts), samples.best), np.float64)
        out["best_of_n/gold_reward"], out["best_of_n/gold_reward_sem"] = mean_and_sem(gold)
        every = [c for row in samples.completions for c in row]
        out["best_of_n/gold_reward_of_samples"] = float(np.mean(
            gold_fn([p for p in prompts for _ in range(n)], every)))
    return out
