"""SFT step: loss definition, masking, gradient accumulation, and sharded == 1 device."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jalign.steps import decoder_logprob_fn
from jalign import sharding as shd
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, unembedding
from jalign.steps.sft import make_sft_step
from jalign.models import decoder_init_fn
from jalign.state import init_train_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48)


def _batch(b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, CFG.vocab_size, (b, t)).astype(np.int32)
    loss_mask = np.zeros((b, t), np.int32)
    for i in range(b):  # prompt of random length, then completion
        loss_mask[i, rng.integers(2, t // 2):] = 1
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def grad_recorder():
    """An 'optimizer' that leaves params alone and keeps the last gradients as its state."""
    return optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _state(mesh, optimizer):
    state, shardings = init_train_state(decoder_init_fn(CFG), optimizer, mesh, shd.DEFAULT_RULES, seed=0)
    return state, shardings


def test_loss_is_token_mean_nll_of_completion_tokens():
    opt = optax.sgd(0.0)
    mesh = shd.make_mesh({"fsdp": 1}, jax.devices()[:1])
    state, _ = _state(mesh, opt)
    batch = _batch()
    _, metrics = jax.jit(make_sft_step(decoder_logprob_fn(CFG, with_stats=True), opt))(state, batch)
    hidden = Decoder(CFG).apply({"params": state.params}, batch["tokens"])
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(hidden[:, :-1] @ unembedding(state.params, CFG), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tgt = batch["tokens"][:, 1:]
    tok_logp = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:] > 0
    np.testing.assert_allclose(metrics["loss"], -tok_logp[mask].mean(), rtol=1e-4)
    acc = (logits.argmax(-1) == tgt)[mask].mean()
    np.testing.assert_allclose(metrics["mean_token_accuracy"], acc, atol=1e-6)
    p = np.exp(logp)
    ent = -(p * logp).sum(-1)[mask].mean()
    np.testing.assert_allclose(metrics["entropy"], ent, rtol=1e-4)


def test_gradient_accumulation_equals_full_batch():
    opt = grad_recorder()
    mesh = shd.make_mesh({"fsdp": 1}, jax.devices()[:1])
    batch = _batch()
    s1, _ = _state(mesh, opt)
    s2, _ = _state(mesh, opt)
    out1, m1 = jax.jit(make_sft_step(decoder_logprob_fn(CFG, with_stats=True), opt))(s1, batch)
    out4, m4 = jax.jit(make_sft_step(decoder_logprob_fn(CFG, with_stats=True), opt, grad_accum_steps=4))(s2, batch)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    chex.assert_trees_all_close(out1.opt_state, out4.opt_state, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 4}])  # fsdp=8: the PPO test
def test_sharded_step_equals_single_device(mesh_shape):
    """Loss and gradients on 8 devices equal 1 device."""
    opt = grad_recorder()
    batch = _batch()
    results = []
    for shape, devices in (({"fsdp": 1}, jax.devices()[:1]), (mesh_shape, jax.devices()[:8])):
        mesh = shd.make_mesh(shape, devices)
        state, shardings = _state(mesh, opt)
        data_sharding = shd.data_sharding(mesh, shd.DEFAULT_RULES)
        step = jax.jit(make_sft_step(decoder_logprob_fn(CFG, with_stats=True), opt), in_shardings=(shardings, data_sharding),
                       out_shardings=(shardings, shd.replicated(mesh)))
        with jax.set_mesh(mesh):
            new_state, metrics = step(state, jax.device_put(batch, data_sharding))
        if len(devices) == 8:
            emb = new_state.params["embed"]
            assert len(emb.sharding.device_set) == 8
            assert emb.addressable_shards[0].data.shape[1] == CFG.hidden_size // mesh.shape["fsdp"]
        results.append((jax.device_get(metrics), jax.device_get(new_state.opt_state)))
    (m1, g1), (m8, g8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(g1, g8, rtol=1e-5, atol=1e-8)
