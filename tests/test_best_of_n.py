"""Best-of-n (jalign.best_of_n): the selection's KL against log n - (n-1)/n, and the
sampled evaluation keeping each prompt's highest-reward completion by a run's reward."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algorithms.rl_inputs import best_of_n_evaluator, rl_inputs
from jalign.algorithms.rl_spec import rl_spec
from jalign.best_of_n import best_of_n_kl, select_best
from jalign.config_utils import base_config
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder
from jalign.tokenizer import builtin_tokenizer
from tests import rl_reward_fns


@pytest.mark.parametrize("weights", ["uniform", "dirichlet"])
def test_selection_kl_matches_the_formula_for_n_2_to_16(weights):
    """Monte-Carlo of select_best on a 100-outcome distribution with distinct rewards: the
    plug-in KL of the chosen outcomes' frequencies to p, against log n - (n-1)/n."""
    rng = np.random.default_rng(0)
    m, trials = 100, 100_000
    p = np.full(m, 1 / m) if weights == "uniform" else rng.dirichlet(np.full(m, 20.0))
    reward = rng.permutation(m).astype(np.float64)
    for n in range(2, 17):
        draws = rng.choice(m, size=(trials, n), p=p)
        chosen = draws[np.arange(trials), select_best(reward[draws])]
        q = np.bincount(chosen, minlength=m) / trials
        kl = float(np.sum(q[q > 0] * np.log(q[q > 0] / p[q > 0])))
        formula = math.log(n) - (n - 1) / n
        assert best_of_n_kl(n) == pytest.approx(formula, rel=1e-12)
        assert kl == pytest.approx(formula, rel=0.05), n


def test_select_best_takes_the_first_maximum_and_skips_unscored():
    rewards = np.array([[0.1, 0.7, 0.7], [np.nan, -1.0, -2.0], [np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(select_best(rewards), [1, 1, 0])


def test_best_of_n_keeps_each_prompts_highest_reward_completion():
    """Through an RL config's reward sources (a python proxy) on a task's held-out prompts."""
    config = base_config()
    config.algo, config.data.task, config.data.num_train_examples = "grpo", "sort", 16
    config.data.max_length, config.data.max_prompt_length = 48, 32
    config.rl.reward_sources = "python:tests.rl_reward_fns.digit_fraction"
    config.eval.num_prompts, config.eval.max_new_tokens, config.eval.batch_size = 5, 6, 8
    tokenizer = builtin_tokenizer()
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, intermediate_size=32)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 8), jnp.int32))["params"])
    inputs = rl_inputs(config, rl_spec(config), cfg)
    metrics, samples = best_of_n_evaluator(config, cfg, inputs, n=4)(params)

    prompts = [r["prompt"] for r in inputs.eval_records]
    assert samples.rewards.shape == (5, 4) and len(samples.completions) == 5
    assert any(len(set(row)) > 1 for row in samples.completions)  # n independent draws
    for row, rewards, chosen, best in zip(samples.completions, samples.rewards, samples.chosen,
                                          samples.best):
        proxy = rl_reward_fns.digit_fraction(None, row)
        np.testing.assert_allclose(rewards, proxy, rtol=1e-6)
        assert best == row[int(np.argmax(proxy))] and best == row[chosen]
    assert metrics["best_of_n/kl"] == pytest.approx(math.log(4) - 0.75)
    assert metrics["best_of_n/proxy_reward"] == pytest.approx(samples.rewards.max(1).mean())
    gold = inputs.task.gold_reward(prompts, samples.best)
    assert metrics["best_of_n/gold_reward"] == pytest.approx(float(np.mean(gold)))
    assert np.isfinite(metrics["best_of_n/gold_reward_sem"])
