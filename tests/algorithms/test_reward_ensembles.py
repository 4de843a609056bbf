"""Reward-model ensembles as an RL reward source (config.rl.reward_model = "A,B,...",
config.rl.reward_ensemble): the combinations against NumPy, and the saved models' wiring."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from jalign.algorithms.reward_sources import combine_ensemble
from jalign.algorithms.rl_inputs import reward_ensemble_fn
from jalign.algorithms.rl_spec import rl_spec
from jalign.checkpoint import save_params
from jalign.config_utils import base_config
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn
from jalign.tokenizer import builtin_tokenizer


def test_combinations_against_numpy():
    scores = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    mean = scores.astype(np.float64).mean(0)
    std = np.sqrt(((scores - mean) ** 2).mean(0))
    np.testing.assert_allclose(combine_ensemble(scores, "mean"), mean, rtol=1e-6)
    np.testing.assert_allclose(combine_ensemble(scores, "uncertainty", lam=0.5), mean - 0.5 * std,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(combine_ensemble(scores, "min"), scores.min(0))
    for how in ("mean", "uncertainty", "min"):  # one member is the model itself
        np.testing.assert_array_equal(combine_ensemble(scores[:1], how, lam=3.0), scores[0])
    with pytest.raises(ValueError, match="reward_ensemble"):
        combine_ensemble(scores, "median")


def test_saved_reward_models_combine_per_sample(tmp_path):
    tokenizer = builtin_tokenizer()
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, intermediate_size=32)
    paths = []
    for k in range(2):  # the head is zero at init: give each member a random one
        params = nn.meta.unbox(scalar_model_init_fn(cfg)(jax.random.PRNGKey(k)))
        params["score_head"] = jax.random.normal(jax.random.PRNGKey(10 + k), (cfg.hidden_size,))
        paths.append(str(tmp_path / f"rm{k}"))
        save_params(paths[-1], params)
    prompts, completions = ["3 1 2", "9 8", "5 5 1 0"], ["1 2 3", "8 9", "0 1"]

    def scores(members, how="mean", lam=1.0):
        fn = reward_ensemble_fn(members, cfg, tokenizer, 32, combine=how, lam=lam)
        return np.asarray(fn(prompts, completions))

    single = [scores([p]) for p in paths]
    assert not np.allclose(single[0], single[1])
    for how in ("uncertainty", "min"):
        np.testing.assert_array_equal(scores(paths[:1], how, lam=2.0), single[0])
    both = np.stack(single)
    np.testing.assert_allclose(scores(paths), both.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scores(paths, "min"), both.min(0), rtol=1e-6)
    np.testing.assert_allclose(scores(paths, "uncertainty", 2.0),
                               both.mean(0) - np.abs(both[0] - both[1]), rtol=1e-5, atol=1e-6)


def test_config_keys_are_read_and_checked():
    config = base_config()
    config.algo = "grpo"
    config.rl.reward_sources = "model"
    config.rl.reward_model = "a/final_params,b/final_params"
    config.rl.reward_ensemble, config.rl.reward_ensemble_lambda = "uncertainty", 0.5
    spec = rl_spec(config)
    assert (spec.reward_ensemble, spec.reward_ensemble_lambda) == ("uncertainty", 0.5)
    config.rl.reward_ensemble = "median"
    with pytest.raises(ValueError, match="config.rl.reward_ensemble"):
        rl_spec(config)
