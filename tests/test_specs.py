"""Config sections read once into typed specs; pipeline overrides checked before training."""

import functools
import os

import numpy as np
import pytest

from jalign import losses
from jalign.algorithms import get_algorithm
from jalign.algorithms.preference import pair_spec
from jalign.config_utils import base_config
from jalign.pipeline import run_pipeline
from tests.train_helpers import parse_config


def _pair_inputs(seed=0, n=6):
    rng = np.random.default_rng(seed)
    logps = [rng.normal(-20.0, 3.0, n).astype(np.float32) for _ in range(4)]
    lengths = dict(chosen_lengths=rng.integers(3, 9, n).astype(np.float32),
                   rejected_lengths=rng.integers(3, 9, n).astype(np.float32))
    return logps, lengths


def test_online_dpo_reads_config_dpo_like_offline_dpo():
    config = base_config()
    config.algo = "online_dpo"
    config.dpo.loss_type = "sigmoid,bco_pair"
    config.dpo.loss_weights = [0.8, 0.2]
    config.dpo.label_smoothing = 0.1
    config.dpo.beta = 0.3
    spec = get_algorithm("online_dpo").spec(config).preference
    assert spec.reference == "params" and spec.loss_types == ("sigmoid", "bco_pair")
    logps, lengths = _pair_inputs()
    got, _ = spec.loss_fn(*logps, **lengths)
    want, _ = losses.dpo_loss(*logps, loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2),
                              label_smoothing=0.1, beta=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain, _ = losses.dpo_loss(*logps, beta=0.3)
    assert not np.allclose(got, plain)  # the mix and the smoothing changed the loss
    # The same section through offline DPO gives the same loss function.
    offline, _ = pair_spec(config).loss_fn(*logps, **lengths)
    np.testing.assert_allclose(offline, got, rtol=0)


def test_online_dpo_step_trains_on_a_loss_mix():
    config = base_config()
    config.algo = "online_dpo"
    config.dpo.loss_type = "sigmoid,sft"
    spec = get_algorithm("online_dpo").spec(config).preference
    logps, lengths = _pair_inputs(1)
    got, _ = spec.loss_fn(*logps, **lengths)
    want, _ = losses.dpo_loss(*logps, loss_type=("sigmoid", "sft"), beta=0.1, **lengths)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("loss_type", "sigmiod", "config.dpo.loss_type 'sigmiod' is not known"),
    ("loss_type", "simpo,sigmoid", "cannot be mixed"),
])
def test_bad_dpo_section_is_named_once_for_every_user(field, value, message):
    config = base_config()
    config.dpo[field] = value
    for algo in ("dpo", "online_dpo"):
        config.algo = algo
        with pytest.raises(ValueError, match=message):
            get_algorithm(algo).spec(config)


def test_accumulation_with_a_batch_coupled_loss_is_refused_at_config_time():
    config = base_config()
    config.dpo.loss_type = "sigmoid,sft"
    config.optimizer.grad_accum_steps = 2
    with pytest.raises(ValueError, match=r"grad_accum_steps=2 with config.dpo.loss_type \['sft'\]"):
        pair_spec(config)


@pytest.mark.parametrize("override, message", [
    ({"dpo": {"train": {"num_stesp": 3}}}, r"config.pipeline.dpo.train.num_stesp overrides an "
                                           r"unknown key"),
    ({"dpo": {"dpo": {"loss_type": "sigmiod"}}}, "config.dpo.loss_type 'sigmiod' is not known"),
    ({"dpo": {"data": {"on_bad_row": "skipp"}}}, r"config.data.on_bad_row = 'skipp' is not valid"),
    ({"dop": {"train": {"num_steps": 3}}}, r"config.pipeline.dop is not an algorithm"),
])
def test_a_pipeline_override_typo_fails_before_the_first_stage_trains(tmp_path, override, message):
    config = parse_config(config="configs/quickstart.py:test")
    for stage, values in override.items():
        if stage in config.pipeline:
            for section, fields in values.items():
                for key, value in fields.items():
                    config.pipeline[stage][section] = dict(config.pipeline[stage].get(section, {}),
                                                           **{key: value})
        else:
            config.pipeline[stage] = values
    with pytest.raises(ValueError, match=message):
        run_pipeline(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "sft")  # nothing trained


def test_rl_section_reaches_the_policy_loss_as_trl_names_it():
    from jalign.algorithms.rl_spec import rl_spec
    config = base_config()
    config.algo = "grpo"
    config.rl.importance_sampling_level = "sequence"
    config.rl.dual_clip = 3.0
    config.rl.kl_beta = 0.04
    loss = rl_spec(config).policy_loss
    assert loss["importance_sampling_level"] == "sequence" and loss["dual_clip"] == 3.0
    assert loss["use_bias_correction_kl"] is True and loss["kl_beta"] == 0.04  # TRL's default
    config.algo = "rloo"
    loss = rl_spec(config).policy_loss
    assert loss["importance_sampling_level"] == "sequence_sum" and loss["kl_beta"] == 0.0
    config.rl.dual_clip = 0.5
    with pytest.raises(ValueError, match="config.rl.dual_clip must be > 1"):
        rl_spec(config)
    config.rl.dual_clip = 0.0
    config.rl.importance_sampling_level = "sentence"
    with pytest.raises(ValueError, match="config.rl.importance_sampling_level = 'sentence'"):
        rl_spec(config)


def test_reward_sources_with_parameters_split_where_a_new_source_starts():
    from jalign.algorithms.rl_spec import split_reward_sources
    assert split_reward_sources("math_answer, soft_overlong:max=64,cache=16,python:m.f") == (
        "math_answer", "soft_overlong:max=64,cache=16", "python:m.f")
    assert split_reward_sources("length_penalty:target=2,coef=0.1,gold,") == (
        "length_penalty:target=2,coef=0.1", "gold")
