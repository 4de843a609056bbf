"""Held-out evaluation: the standard error reported with every mean over prompts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jalign.evaluate import evaluate_policy, mean_and_sem
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder
from jalign.tokenizer import builtin_tokenizer


def test_mean_and_sem_against_numpy():
    values = np.array([0.2, 0.9, 0.4, 0.4, 1.0, 0.0, 0.7])
    mean, sem = mean_and_sem(values)
    np.testing.assert_allclose(mean, np.mean(values))
    np.testing.assert_allclose(sem, np.sqrt(np.sum((values - values.mean()) ** 2) / 6) / np.sqrt(7))
    assert np.isnan(mean_and_sem([0.5])[1])


def test_evaluate_policy_reports_the_sem_of_known_per_prompt_rewards():
    tokenizer = builtin_tokenizer()
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, intermediate_size=32)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    greedy, sampled = rng.normal(size=10), rng.uniform(size=10)
    sampled[3] = np.nan  # not scored: left out of the mean and the sem
    calls = iter([greedy, sampled] * 3)  # greedy then sampled, per batch

    def score_fn(indices, completions, lengths):
        return {"gold_reward": next(calls)[indices]}

    out = evaluate_policy(params, cfg, tokenizer, None, [f"p{i}" for i in range(10)],
                          max_new_tokens=3, batch_size=4, score_fn=score_fn)
    kept = sampled[~np.isnan(sampled)]
    np.testing.assert_allclose(out["gold_reward/greedy"], greedy.mean())
    np.testing.assert_allclose(out["gold_reward/greedy_sem"],
                               np.std(greedy, ddof=1) / np.sqrt(10))
    np.testing.assert_allclose(out["gold_reward/sampled"], kept.mean())
    np.testing.assert_allclose(out["gold_reward/sampled_sem"], np.std(kept, ddof=1) / 3.0)
