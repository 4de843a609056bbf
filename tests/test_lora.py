"""LoRA / QLoRA: the reference is the base without adapters, no second tree, only adapters train."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jalign.algorithms.preference import pair_spec
from jalign.config_utils import base_config
from jalign.steps import decoder_logprob_fn
from jalign import lora, losses
from jalign import sharding as shd
from jalign.memory import per_device_bytes
from jalign.data import make_preference_dataset, preference_records_from_dicts
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder
from jalign.steps.common import shifted_logprobs
from jalign.steps.preference import make_dpo_step
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer
from jalign.models import decoder_init_fn
from jalign.state import init_train_state

BASE = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=128)
LORA = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, lora_base_dtype="float32")


@functools.lru_cache(maxsize=None)
def _batch(batch_size=8):
    rows = get_task("sort").preference_pairs(32, seed=0)
    records = preference_records_from_dicts(rows)[0]
    ds = make_preference_dataset(records, builtin_tokenizer(), batch_size=batch_size,
                                 max_length=48, seed=0, shuffle=False)
    return next(iter(ds))


def _mesh(n=1):
    return shd.make_mesh({"fsdp": n}, jax.devices()[:n])


def _state(cfg, *, lr=0.0, n=1, with_reference=False):
    opt = optax.adam(lr)
    return init_train_state(decoder_init_fn(cfg), opt, _mesh(n), shd.DEFAULT_RULES, seed=0,
                            with_reference=with_reference, model_cfg=cfg), opt


def _perturbed_adapters(params):
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype), params)


def _dpo_step(cfg, opt):
    return jax.jit(make_dpo_step(decoder_logprob_fn(cfg), opt, loss_fn=functools.partial(losses.dpo_loss, beta=0.1)))


def test_state_holds_adapters_and_a_frozen_base_only():
    (state, _), _ = _state(LORA)
    assert set(state.frozen) == {"base"}  # no reference copy
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert names and all("_lora_a" in n or "_lora_b" in n for n in names), names
    base_names = jax.tree_util.tree_flatten_with_path(state.frozen["base"])[0]
    assert not any("_lora_" in jax.tree_util.keystr(p) for p, _ in base_names)
    # Optimizer state only for the adapters: Adam's two moments of each adapter leaf.
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_leaves) == 2 * lora.num_params(state.params)
    assert lora.num_params(state.params) < 0.1 * lora.num_params(state.frozen["base"])


def test_adapters_disabled_give_the_base_model_exactly():
    (state, _), _ = _state(LORA)
    base = state.frozen["base"]
    batch = _batch()
    adapters = _perturbed_adapters(state.params)
    plain, _ = shifted_logprobs(base, BASE, batch)            # a model without LoRA at all
    disabled, _ = shifted_logprobs(base, LORA, batch)          # LoRA model, adapters absent
    with_adapters, _ = shifted_logprobs(lora.merge(base, adapters), LORA, batch)
    np.testing.assert_array_equal(np.asarray(disabled), np.asarray(plain))
    assert np.abs(np.asarray(with_adapters) - np.asarray(plain)).max() > 1e-3


def test_lora_dpo_reference_is_the_base_and_only_adapters_move():
    (state, _), opt = _state(LORA, lr=1e-2)
    base_before = jax.tree.map(np.asarray, state.frozen["base"])
    adapters_before = jax.tree.map(np.asarray, state.params)
    step = _dpo_step(LORA, opt)
    state, metrics = step(state, _batch())
    # B starts at zero, so policy == reference (the base) and the loss is log 2 (up to
    # the float rounding of a differently fused program).
    assert float(metrics["loss"]) == pytest.approx(np.log(2.0), abs=1e-6)
    assert abs(float(metrics["rewards/margins"])) < 1e-6
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen["base"]),
                 base_before)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                         adapters_before)
    assert max(jax.tree.leaves(moved)) > 0
    state, metrics = step(state, _batch())
    assert float(metrics["rewards/margins"]) != 0.0


def test_no_second_parameter_tree_in_the_compiled_step():
    """Compiled memory analysis: LoRA's step arguments are the adapters, their optimizer
    state and one base; keeping a separate reference copy adds exactly one base."""
    (state, _), opt = _state(LORA)
    batch = jax.tree.map(jnp.asarray, _batch())
    step = _dpo_step(LORA, opt)
    lean = step.lower(state, batch).compile().memory_analysis()
    base = state.frozen["base"]
    with_copy = state.replace(frozen={"base": base, "reference": jax.tree.map(jnp.copy, base)})
    fat = step.lower(with_copy, batch).compile().memory_analysis()
    base_bytes = per_device_bytes(base)
    state_bytes = per_device_bytes(state)
    # (XLA's count differs from the leaf sizes by a few bytes of scalar padding)
    assert lean.argument_size_in_bytes == pytest.approx(state_bytes + per_device_bytes(batch),
                                                        abs=256)
    assert fat.argument_size_in_bytes - lean.argument_size_in_bytes == pytest.approx(base_bytes,
                                                                                    abs=256)
    # and full fine-tuning with a reference holds two full trees plus Adam's two moments
    (full, _), _ = _state(BASE, with_reference=True)
    assert per_device_bytes(full) > 3 * base_bytes > 2 * state_bytes


def test_merged_adapters_export_the_same_model():
    (state, _), _ = _state(LORA)
    params = lora.merge(state.frozen["base"], _perturbed_adapters(state.params))
    merged = lora.merge_adapters(params, LORA)
    assert not any("_lora_" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
    tokens = _batch()["tokens"]
    want = Decoder(LORA).apply({"params": params}, tokens)
    got = Decoder(BASE).apply({"params": merged}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("qtype, storage, max_rel", [("int8", jnp.int8, 0.02),
                                                     ("nf4", jnp.uint4, 0.25)])
def test_quantised_base_is_sharded_close_to_the_base_and_matches_one_device(qtype, storage,
                                                                            max_rel):
    cfg = dataclasses.replace(LORA, lora_quantization=qtype, lora_quantization_block=32)
    (state8, _), opt = _state(cfg, n=8)
    q_proj = state8.frozen["base"]["layers"]["attn"]["q_proj"]
    assert q_proj.qvalue.dtype == storage
    assert q_proj.qvalue.sharding.spec[1] == "fsdp"  # the embed axis stays fully sharded
    (dense, _), _ = _state(LORA)
    batch = _batch()
    exact, _ = shifted_logprobs(dense.frozen["base"], BASE, batch)
    approx, _ = shifted_logprobs(jax.device_get(state8.frozen["base"]), cfg, batch)
    rel = np.abs(np.asarray(approx) - np.asarray(exact)).max() / np.abs(np.asarray(exact)).max()
    assert 0 < rel < max_rel
    (state1, _), _ = _state(cfg, n=1)
    step = _dpo_step(cfg, opt)
    adapters = _perturbed_adapters(jax.device_get(state1.params))
    _, m1 = step(state1.replace(params=adapters), batch)
    _, m8 = step(state8.replace(params=jax.device_put(adapters, jax.tree.map(
        lambda x: x.sharding, state8.params))), batch)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)


def test_lora_dropout_is_used_in_training_only():
    cfg = dataclasses.replace(LORA, lora_dropout=0.5)
    (state, _), _ = _state(cfg)
    params = lora.merge(state.frozen["base"], _perturbed_adapters(state.params))
    batch = _batch()
    a, _ = shifted_logprobs(params, cfg, batch)
    b, _ = shifted_logprobs(params, cfg, batch)
    c, _ = shifted_logprobs(params, cfg, batch, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0


def test_bad_lora_config_names_the_key():
    with pytest.raises(ValueError, match="model.lora_targets"):
        ModelConfig(lora_rank=4, lora_targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="model.lora_quantization"):
        ModelConfig(lora_rank=4, lora_quantization="int3")
    config = base_config()
    config.model.lora_rank, config.dpo.ref_sync_every = 4, 2
    with pytest.raises(ValueError, match="ref_sync_every"):
        pair_spec(config)


def test_export_merges_saved_adapters_into_the_base(tmp_path):
    from jalign.checkpoint import save_params
    from jalign.convert import export_hf
    from jalign.models import hf

    (state, _), _ = _state(LORA)
    adapters = _perturbed_adapters(state.params)
    save_params(str(tmp_path / "base"), state.frozen["base"])
    save_params(str(tmp_path / "adapters"), adapters)
    export_hf(str(tmp_path / "base"), LORA, str(tmp_path / "hf"),
              adapters_dir=str(tmp_path / "adapters"))
    config, params = hf.from_pretrained(str(tmp_path / "hf"))
    assert config.lora_rank == 0
    tokens = _batch()["tokens"]
    want = Decoder(LORA).apply({"params": lora.merge(state.frozen["base"], adapters)}, tokens)
    got = Decoder(config).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
    with pytest.raises(ValueError, match="lora_rank > 0"):
        export_hf(str(tmp_path / "base"), BASE, str(tmp_path / "hf2"),
                  adapters_dir=str(tmp_path / "adapters"))


@pytest.mark.parametrize("qtype", ["none", "nf4"])
def test_sampler_on_a_lora_model_matches_its_forward_pass(qtype):
    """Rollouts of a (Q)LoRA policy: the sampler's log-probs equal a full forward pass's."""
    from jalign.generate import generate, left_pad

    cfg = dataclasses.replace(LORA, lora_quantization=qtype, lora_quantization_block=32)
    (state, _), _ = _state(cfg)
    params = lora.merge(state.frozen["base"], _perturbed_adapters(state.params))
    prompt, mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    out = generate(params, cfg, prompt, mask, jax.random.key(3), max_new_tokens=6, eos_id=2,
                   pad_id=0)
    comp = np.asarray(out.completion_mask)
    segments = np.concatenate([mask, comp], 1)
    batch = {"tokens": np.asarray(out.tokens), "segment_ids": segments,
             "loss_mask": np.concatenate([np.zeros_like(mask), comp], 1),
             "positions": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32)}
    logps, _ = shifted_logprobs(params, cfg, batch)
    forward = np.asarray(logps)[:, prompt.shape[1] - 1:] * comp
    np.testing.assert_allclose(np.asarray(out.logps), forward, rtol=1e-5, atol=1e-5)
    assert comp.sum() > 0
