"""PPO / GRPO steps on rollout-shaped batches: sharded == single device, sane first update."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jalign.steps import decoder_logprob_fn, decoder_value_fn
from jalign import sharding as shd
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn
from jalign.steps.rl import make_policy_gradient_step, make_ppo_step
from jalign.models import decoder_init_fn
from jalign.state import init_train_state

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48)


def grad_recorder():
    return optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _rollout_batch(n=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    prompt = 6
    tokens = rng.integers(4, CFG.vocab_size, (n, t)).astype(np.int32)
    loss_mask = np.zeros((n, t), np.int32)
    lengths = rng.integers(3, t - prompt, n)
    segment = np.zeros((n, t), np.int32)
    for i, length in enumerate(lengths):
        loss_mask[i, prompt:prompt + length] = 1
        segment[i, :prompt + length] = 1
    mask = loss_mask[:, 1:].astype(np.float32)
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment,
            "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1)),
            "old_logps": (rng.normal(size=(n, t - 1)) * 0.1 - 4.0).astype(np.float32) * mask,
            "old_values": rng.normal(size=(n, t - 1)).astype(np.float32) * mask,
            "returns": rng.normal(size=(n, t - 1)).astype(np.float32) * mask,
            "advantages": rng.normal(size=(n, t - 1)).astype(np.float32) * mask,
            "kl": rng.random(n).astype(np.float32)}


def _ppo_params_init(rng):
    a, b = jax.random.split(rng)
    return {"policy": decoder_init_fn(CFG)(a), "critic": scalar_model_init_fn(CFG)(b)}


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}])  # data x fsdp: the SFT and DPO tests
def test_ppo_iteration_sharded_equals_single_device(mesh_shape):
    batch = _rollout_batch()
    results = []
    for shape, n in (({"fsdp": 1}, 1), (mesh_shape, 8)):
        mesh = shd.make_mesh(shape, jax.devices()[:n])
        opt = grad_recorder()
        state, shardings = init_train_state(_ppo_params_init, opt, mesh, shd.DEFAULT_RULES, seed=0,
                                            with_reference="policy",
                                            frozen_extra={"kl_coef": jnp.float32(0.05)})
        ds = shd.data_sharding(mesh, shd.DEFAULT_RULES)
        step = jax.jit(make_ppo_step(decoder_logprob_fn(CFG, with_stats=True), decoder_value_fn(CFG), opt, num_iterations=2, kl_target=6.0, entropy_coef=0.01),
                       in_shardings=(shardings, ds), out_shardings=(shardings, shd.replicated(mesh)))
        with jax.set_mesh(mesh):
            new, metrics = step(state, jax.device_put(batch, ds))
        results.append((jax.device_get(metrics), jax.device_get(new.opt_state),
                        float(new.frozen["kl_coef"])))
    (m1, g1, k1), (m8, g8, k8) = results
    for key in ("loss", "loss/policy_avg", "loss/value_avg", "objective/entropy",
                "policy/clipfrac_avg", "val/clipfrac_avg"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5, err_msg=key)
    # gradients of size ~1e-4: float32 reduction order across devices moves them by ~1e-8
    chex.assert_trees_all_close(g1, g8, rtol=1e-5, atol=1e-7)
    assert k1 == pytest.approx(k8) and k1 != 0.05  # the adaptive controller moved


def test_grpo_first_update_is_the_policy_gradient():
    """At ratio 1 the clipped loss equals -mean(A) per token and its gradient is non-zero."""
    mesh = shd.make_mesh({"fsdp": 1}, jax.devices()[:1])
    opt = grad_recorder()
    state, _ = init_train_state(decoder_init_fn(CFG), opt, mesh, shd.DEFAULT_RULES, seed=0)
    batch = _rollout_batch()
    from jalign.steps.common import shifted_logprobs
    batch["old_logps"] = np.asarray(jax.jit(lambda p, b: shifted_logprobs(p, CFG, b)[0])(
        state.params, batch))
    batch["advantages"] = np.linspace(-1, 1, batch["tokens"].shape[0]).astype(np.float32)
    step = jax.jit(make_policy_gradient_step(decoder_logprob_fn(CFG), opt, loss_kwargs={"loss_aggregation": "bnpo"}))
    _, metrics = step(state, batch)
    mask = batch["loss_mask"][:, 1:]
    want = -(batch["advantages"][:, None] * mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    assert float(metrics["policy/approxkl_avg"]) < 1e-10
    assert float(metrics["grad_norm"]) > 0


def _equal_length_batch(n=8, t=16, seed=1):
    """Every sequence has the same completion length: minibatch token means average to the batch's."""
    batch = _rollout_batch(n, t, seed)
    mask = np.zeros_like(batch["loss_mask"])
    mask[:, 6:12] = 1
    segment = np.zeros_like(mask)
    segment[:, :12] = 1
    m = mask[:, 1:].astype(np.float32)
    return dict(batch, loss_mask=mask, segment_ids=segment,
                **{k: batch[k] * m for k in ("old_logps", "old_values", "returns", "advantages")})


def _single_device_state(params_init, opt, **kwargs):
    mesh = shd.make_mesh({"fsdp": 1}, jax.devices()[:1])
    return init_train_state(params_init, opt, mesh, shd.DEFAULT_RULES, seed=0, **kwargs)[0]


def _ppo_state(opt):
    return _single_device_state(_ppo_params_init, opt, with_reference="policy",
                                frozen_extra={"kl_coef": jnp.float32(0.05)})


def test_one_minibatch_epochs_are_repeated_full_batch_updates():
    """num_minibatches=1: two epochs in one step == two one-epoch steps, in order, unshuffled."""
    opt = optax.adam(1e-2)
    batch = _rollout_batch()
    two = jax.jit(make_ppo_step(decoder_logprob_fn(CFG, with_stats=True), decoder_value_fn(CFG), opt, num_iterations=2, entropy_coef=0.01))
    one = jax.jit(make_ppo_step(decoder_logprob_fn(CFG, with_stats=True), decoder_value_fn(CFG), opt, num_iterations=1, entropy_coef=0.01))
    state = _ppo_state(opt)
    want_state, _ = one(state, batch)
    want_state, want_metrics = one(want_state, batch)
    got_state, got_metrics = two(state, batch)
    chex.assert_trees_all_close(got_state.params, want_state.params, rtol=1e-6, atol=1e-7)
    assert float(got_metrics["policy/approxkl_avg"]) > 0  # the second epoch saw ratios != 1
    for key in ("loss", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg",
                "policy/clipfrac_avg", "val/clipfrac_avg", "grad_norm"):
        np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)


def test_minibatch_metrics_at_zero_learning_rate_equal_the_full_batch(num_minibatches=4):
    """Frozen params: the minibatches partition the batch, so their averaged metrics are the batch's."""
    opt = optax.sgd(0.0)
    batch = _equal_length_batch()
    state = _ppo_state(opt)
    full = jax.jit(make_ppo_step(decoder_logprob_fn(CFG, with_stats=True), decoder_value_fn(CFG), opt, num_iterations=2))(state, batch)[1]
    split = jax.jit(make_ppo_step(decoder_logprob_fn(CFG, with_stats=True), decoder_value_fn(CFG), opt, num_iterations=2, num_minibatches=num_minibatches))(
        state, batch)[1]
    for key in ("loss", "loss/policy_avg", "loss/value_avg", "objective/entropy",
                "policy/approxkl_avg", "policy/clipfrac_avg", "val/clipfrac_avg"):
        np.testing.assert_allclose(split[key], full[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert float(full["policy/clipfrac_avg"]) > 0 and float(full["val/clipfrac_avg"]) > 0


def test_policy_gradient_minibatches_share_the_implementation():
    """The critic-free step splits the same way (zero learning rate)."""
    opt = optax.sgd(0.0)
    batch = dict(_equal_length_batch(), advantages=np.linspace(-1, 1, 8).astype(np.float32))
    state = _single_device_state(decoder_init_fn(CFG), opt)
    kwargs = dict(loss_kwargs={"loss_aggregation": "grpo"}, num_iterations=2)
    full = jax.jit(make_policy_gradient_step(decoder_logprob_fn(CFG), opt, **kwargs))(state, batch)[1]
    split = jax.jit(make_policy_gradient_step(decoder_logprob_fn(CFG), opt, num_minibatches=4, **kwargs))(state, batch)[1]
    for key in ("loss", "policy/approxkl_avg", "policy/clipfrac_avg"):
        np.testing.assert_allclose(split[key], full[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_k_minibatches_take_k_optimizer_steps_shuffled_by_the_step_rng():
    opt = optax.adam(1e-2)
    batch = _rollout_batch()
    step = jax.jit(make_ppo_step(decoder_logprob_fn(CFG, with_stats=True), decoder_value_fn(CFG), opt, num_iterations=3, num_minibatches=2))
    state = _ppo_state(opt)
    new, _ = step(state, batch)
    assert int(new.opt_state[0].count) == 3 * 2
    assert int(new.step) == 1  # one train step per rollout batch
    # The shuffle comes from the state: the same state repeats it, another step number does not.
    again, _ = step(state, batch)
    chex.assert_trees_all_equal(again.params, new.params)
    later, _ = step(state.replace(step=state.step + 1), batch)
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), later.params, new.params)
    assert max(jax.tree.leaves(diff)) > 0


def test_batch_that_does_not_split_into_minibatches_is_named():
    opt = optax.sgd(0.0)
    step = make_ppo_step(decoder_logprob_fn(CFG, with_stats=True), decoder_value_fn(CFG), opt, num_minibatches=3)
    with pytest.raises(ValueError, match=r"rollout batch of 8 sequences .*config.rl.num_minibatches=3"):
        jax.jit(step)(_ppo_state(opt), _rollout_batch())
    with pytest.raises(ValueError, match="config.rl.num_minibatches"):
        make_policy_gradient_step(decoder_logprob_fn(CFG), opt, num_minibatches=0)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_trainer_logps_at_the_sampling_temperature_equal_the_samplers(softcap):
    """A sampler at T draws from softmax(softcap(z) / T); the trainer's log-probs at T
    (what the RL steps use) are those exactly, so the first update's ratio is 1."""
    import dataclasses
    from jalign.generate import generate
    from jalign.steps.common import shifted_logprobs
    cfg = dataclasses.replace(CFG, final_logit_softcap=softcap)
    params = jax.jit(lambda r: nn.meta.unbox(decoder_init_fn(cfg)(r)))(
        jax.random.PRNGKey(0))
    prompt = jnp.asarray(np.random.default_rng(0).integers(3, 64, (4, 6)), jnp.int32)
    mask = jnp.ones_like(prompt)
    out = generate(params, cfg, prompt, mask, jax.random.PRNGKey(1), max_new_tokens=8,
                   eos_id=1, pad_id=0, temperature=0.7)
    segments = jnp.concatenate([mask, out.completion_mask], 1)
    batch = {"tokens": out.tokens, "segment_ids": segments,
             "loss_mask": jnp.concatenate([jnp.zeros_like(mask), out.completion_mask], 1),
             "positions": jnp.maximum(jnp.cumsum(segments, 1) - 1, 0)}
    completion = np.asarray(out.completion_mask, bool)
    for impl in ("xla", "chunked"):
        at_t = shifted_logprobs(params, cfg, batch, temperature=0.7, logprob_impl=impl)[0]
        np.testing.assert_allclose(np.asarray(at_t)[:, 5:][completion],
                                   np.asarray(out.logps)[completion], atol=1e-5)
    at_1 = shifted_logprobs(params, cfg, batch)[0]
    assert np.abs(np.asarray(at_1)[:, 5:][completion] - np.asarray(out.logps)[completion]).max() > 1e-2
