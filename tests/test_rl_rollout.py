"""A PPO rollout + update on 8 devices keeps the batch split and equals one device.

The rollout's device part (sampling, reference log-probs, values, GAE advantages)
and the update run under `jax.transfer_guard("disallow")`; the only host hop is
the text reward: completion tokens out, one float per sequence back.
"""

import importlib.util
import os

import flax.linen as nn
import jax
import numpy as np
import optax

from jalign import sharding as shd
from jalign.algorithms.rl import ppo_setup, ppo_step
from jalign.algorithms.rl_spec import rl_spec
from jalign.models.config import ModelConfig
from jalign.loop import skip_nonfinite
from jalign.state import init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 16  # 16 prompts x 1 completion: 2 rows per device on 8 devices


def _ppo_iteration(mesh_shape, devices, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("ppo_tiny", os.path.join(ROOT, "configs", "ppo_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test")
    config.model.update(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48)
    config.data.batch_size = ROWS
    model_cfg = ModelConfig.from_mapping(config.model)
    spec = rl_spec(config)
    setup = ppo_setup(config, model_cfg, spec, str(tmp_path))
    mesh = shd.make_mesh(mesh_shape, devices)
    rules = shd.DEFAULT_RULES
    opt = optax.sgd(1e-2)
    state, shardings = init_train_state(setup.params_init_fn, opt, mesh, rules, seed=0,
                                        with_reference=setup.with_reference,
                                        frozen_extra=setup.frozen_extra)
    batch_sharding = shd.data_sharding(mesh, rules)
    step = jax.jit(skip_nonfinite(ppo_step(config, model_cfg, spec, opt)),
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, shd.replicated(mesh)))
    prompts = next(iter(setup.dataset(0, 1)))

    downloads, uploads = [], []
    device_get, upload = jax.device_get, jax.make_array_from_process_local_data
    monkeypatch.setattr(jax, "device_get", lambda x: (downloads.extend(
        np.shape(a) for a in jax.tree.leaves(x)), device_get(x))[1])
    monkeypatch.setattr(jax, "make_array_from_process_local_data", lambda s, x: (uploads.append(
        (np.shape(x), np.asarray(x).dtype)), upload(s, x))[1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), jax.transfer_guard("disallow"):
        batch, rollout_metrics = setup.rollout(state, prompts, step=0, next_batch=None)
        new_state, metrics = step(state, batch)
    monkeypatch.undo()
    return dict(batch=batch, batch_sharding=batch_sharding, downloads=downloads, uploads=uploads,
                rollout_metrics=rollout_metrics, metrics=jax.device_get(metrics),
                params=jax.device_get(new_state.params), state=new_state, shardings=shardings,
                max_new_tokens=config.rl.max_new_tokens)


def test_ppo_rollout_and_update_stay_batch_split_and_match_one_device(tmp_path, monkeypatch):
    eight = _ppo_iteration({"data": 2, "fsdp": 4}, jax.devices()[:8], tmp_path, monkeypatch)
    batch, sharding = eight["batch"], eight["batch_sharding"]
    assert {"tokens", "loss_mask", "old_logps", "old_values", "advantages", "returns", "kl"} <= set(batch)
    for key, array in batch.items():
        assert isinstance(array, jax.Array), key
        assert array.shape[0] == ROWS
        assert array.sharding.is_equivalent_to(sharding, array.ndim), (key, array.sharding)
        assert {s.data.shape[0] for s in array.addressable_shards} == {ROWS // 8}, key
    # Host hop: out only completion tokens and mask (per-device shards) and scalar metrics;
    # in only the prompt ids and mask, and one float32 score per sequence.
    completion_shard = (ROWS // 8, eight["max_new_tokens"])
    assert set(eight["downloads"]) <= {(), completion_shard}
    assert eight["downloads"].count(completion_shard) == 2 * 8
    shapes = [shape for shape, _ in eight["uploads"]]
    assert len(shapes) == 3 and shapes[0] == shapes[1] and shapes[0][0] == ROWS
    assert eight["uploads"][2] == ((ROWS,), np.float32)
    placed = jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim),
                              eight["state"], eight["shardings"])
    assert all(jax.tree.leaves(placed))

    one = _ppo_iteration({"fsdp": 1}, jax.devices()[:1], tmp_path, monkeypatch)
    for key in ("objective/scores", "objective/kl", "objective/rlhf_reward", "completions/mean_length"):
        np.testing.assert_allclose(eight["rollout_metrics"][key], one["rollout_metrics"][key],
                                   rtol=1e-5, err_msg=key)
    for key in ("loss", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg",
                "policy/clipfrac_avg", "val/clipfrac_avg", "objective/entropy", "grad_norm"):
        np.testing.assert_allclose(eight["metrics"][key], one["metrics"][key], rtol=1e-5,
                                   atol=1e-7, err_msg=key)
    assert float(eight["metrics"]["policy/approxkl_avg"]) > 0  # later minibatches moved the policy
    for a, b in zip(jax.tree.leaves(eight["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
