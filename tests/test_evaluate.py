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


def test_a_pairwise_score_is_the_preference_of_its_win_rate():
    tokenizer = builtin_tokenizer()
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, intermediate_size=32)

    def init(seed):
        return nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(seed),
                                               jnp.zeros((1, 8), jnp.int32))["params"])
    params, other = init(0), init(1)
    prompts = [f"p{i}" for i in range(10)]
    gold = lambda indices, completions, lengths: {"gold_reward": np.zeros(len(indices))}
    common = dict(max_new_tokens=4, batch_size=4, score_fn=gold, win_rate=True)

    def same(indices, ours, theirs):  # the reference is the policy: the same completions
        assert list(ours) == list(theirs) and len(ours) == len(indices)
        return {"judge": np.full(len(indices), 0.5)}
    out = evaluate_policy(params, cfg, tokenizer, None, prompts, ref_params=params,
                          win_rate_by=["gold_reward", "judge"], pairwise_fn=same, **common)
    assert out["winrate/judge/raw"] == 0.5 and out["winrate/raw"] == 0.5

    probs = np.random.default_rng(0).uniform(size=10)
    probs[7] = np.nan  # not compared: left out
    out = evaluate_policy(params, cfg, tokenizer, None, prompts, ref_params=other,
                          win_rate_by=["judge", "gold_reward"],
                          pairwise_fn=lambda indices, ours, theirs: {"judge": probs[indices]},
                          **common)
    np.testing.assert_allclose(out["winrate/raw"], np.nanmean(probs))  # first name: winrate/
    assert 0.0 < out["winrate/length_controlled"] < 1.0
    assert out["winrate/gold_reward/raw"] == 0.5  # all-zero gold: every prompt ties
