"""algo=distill (GKD): the loss, on-policy batches, the teacher's tokenizer check, exact
resume, sharded = single device, and configs/distill_tiny.py:test end to end.

The teacher is a randomly initialised decoder of another size saved as a jalign run
(model_config.json + final_params), so no test trains one first.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import checkpoint as ckpt
from jalign import sharding as shd
from jalign.algorithms import distill
from jalign.algorithms.common import load_tokenizer
from jalign.algorithms.rollout import ROLLOUT_STREAM
from jalign.generate import generate
from jalign.loop import run
from jalign.losses import gkd_loss
from jalign.models import pretrained
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, decoder_init_fn, logits_from_hidden
from jalign.ops import token_divergence
from jalign.optim import make_optimizer
from jalign.state import init_train_state
from jalign.steps.common import shifted_logprobs
from jalign.steps.distill import decoder_divergence_fn
from tests.train_helpers import ENV, ROOT, load_config, read_metrics, run_train

ASSETS = os.path.join(ROOT, "jalign", "assets")


def _numpy_gjsd(zs_NxV, zt_NxV, beta, temperature):
    """GKD's generalised JSD from logits, in float64 (TRL's endpoint convention)."""
    def log_softmax(z):
        z = np.asarray(z, np.float64) / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    ls, lt = log_softmax(zs_NxV), log_softmax(zt_NxV)
    ps, pt = np.exp(ls), np.exp(lt)
    if beta == 0.0:
        return (pt * (lt - ls)).sum(-1)
    if beta == 1.0:
        return (ps * (ls - lt)).sum(-1)
    lm = np.log(beta * pt + (1 - beta) * ps)
    return beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_loss_is_the_masked_sum_of_the_generalised_jsd(beta):
    rng = np.random.default_rng(0)
    hs, ws = rng.normal(size=(2, 5, 8)), rng.normal(size=(8, 11))       # student: width 8
    ht, wt = rng.normal(size=(2, 5, 16)), rng.normal(size=(16, 11)) / 2  # teacher: width 16
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    div = token_divergence(f32(hs.reshape(10, 8)), f32(ws), f32(ht.reshape(10, 16)), f32(wt),
                           beta=beta, temperature=0.9, impl="xla").reshape(2, 5)
    want = _numpy_gjsd(hs @ ws, ht @ wt, beta, 0.9)
    np.testing.assert_allclose(div, want, rtol=2e-5, atol=1e-6)
    # A masked position holding NaN contributes exactly 0, to the value and the gradient.
    div = div.at[0, 2].set(jnp.nan)
    sums, metrics = gkd_loss(div, mask)
    np.testing.assert_allclose(sums, (np.nan_to_num(want) * mask).sum(-1), rtol=2e-5)
    np.testing.assert_allclose(metrics["loss"], (want * mask).sum() / mask.sum(), rtol=2e-5)
    grad = jax.grad(lambda d: gkd_loss(d, mask)[0].sum())(div)
    np.testing.assert_array_equal(grad, mask)


STUDENT = ModelConfig(vocab_size=128, hidden_size=48, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=128)
TEACHER = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96)


def test_decoder_divergence_scores_next_tokens_of_both_decoders():
    """The step's divergence function = the formula on both decoders' full logits, shifted."""
    params_s = nn.meta.unbox(decoder_init_fn(STUDENT)(jax.random.PRNGKey(0)))
    params_t = nn.meta.unbox(decoder_init_fn(TEACHER)(jax.random.PRNGKey(1)))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 4, 100)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(7), (2, 7)),
             "loss_mask": jnp.ones_like(tokens)}
    got = decoder_divergence_fn(STUDENT, TEACHER, beta=0.5, temperature=0.9, impl="xla")(
        params_s, params_t, batch)
    assert got.shape == (2, 6)

    def logits(params, cfg):
        hidden = Decoder(cfg).apply({"params": params}, tokens, batch["positions"],
                                    batch["segment_ids"])
        return np.asarray(logits_from_hidden(hidden, params, cfg))[:, :-1]
    want = _numpy_gjsd(logits(params_s, STUDENT), logits(params_t, TEACHER), 0.5, 0.9)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _write_teacher(path, cfg=TEACHER, tokenizer_dir=""):
    """A jalign run folder (model_config.json, final_params, tokenizer files) of random weights."""
    os.makedirs(path, exist_ok=True)
    params = nn.meta.unbox(decoder_init_fn(cfg)(jax.random.PRNGKey(7)))
    ckpt.save_params(os.path.join(path, "final_params"), params)
    pretrained.write_run_model(path, cfg, tokenizer_dir)
    return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return _write_teacher(tmp_path_factory.mktemp("teacher"))


def _config(teacher, **distill):
    config = load_config("distill_tiny", "test")
    config.pipeline.stages = ""
    config.algo = "distill"
    config.distill.teacher = teacher
    config.distill.divergence_impl = "xla"
    for key, value in distill.items():
        config.distill[key] = value
    config.train.eval_every = 0
    return config


def _setup_and_state(config, mesh):
    spec = distill.spec(config)
    setup = distill.setup(config, STUDENT, spec, "/tmp/unused")
    optimizer, _ = make_optimizer(config.optimizer, config.train.num_steps)
    state, shardings = init_train_state(setup.params_init_fn, optimizer, mesh, shd.DEFAULT_RULES,
                                        seed=config.seed, load_params=setup.load_params,
                                        frozen_subtrees=setup.frozen_subtrees)
    return spec, setup, optimizer, state, shardings


def test_on_policy_batches_are_the_students_samples(teacher_dir):
    config = _config(teacher_dir, temperature=1.0, lmbda=0.5)
    mesh = shd.make_mesh({"fsdp": 1}, jax.devices()[:1])
    _, setup, _, state, _ = _setup_and_state(config, mesh)
    assert "teacher" in state.frozen and "teacher" not in state.params
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(
        make_optimizer(config.optimizer, 3)[0].init(state.params))  # no teacher moments
    host = next(iter(setup.dataset(0, 1)))
    on = next(k for k in range(20) if distill.on_policy_at(config.seed, k, 0.5))
    off = next(k for k in range(20) if not distill.on_policy_at(config.seed, k, 0.5))
    with jax.set_mesh(mesh):
        same, metrics = setup.rollout(state, host, step=off, next_batch=None)
        assert metrics["distill/on_policy"] == 0.0
        np.testing.assert_array_equal(same["tokens"], host["tokens"])
        state = state.replace(step=jnp.int32(on))
        batch, metrics = setup.rollout(state, host, step=on, next_batch=None)
    assert metrics["distill/on_policy"] == 1.0 and set(batch) == set(distill.BATCH_KEYS)
    prompts = distill.completion_prompts(host)
    width = batch["tokens"].shape[1] - config.distill.max_new_tokens
    for row, prompt in zip(np.asarray(batch["tokens"]), prompts):  # the same prompts
        np.testing.assert_array_equal(row[width - len(prompt):width], prompt)
    # The completions are the student's sampler's, from the state's step RNG...
    mask = (np.asarray(batch["loss_mask"]) == 0) & (np.asarray(batch["segment_ids"]) > 0)
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), ROLLOUT_STREAM)
    tokenizer = load_tokenizer(config)
    out = generate(state.params, STUDENT, batch["tokens"][:, :width], jnp.asarray(mask[:, :width],
                   jnp.int32), rng, max_new_tokens=config.distill.max_new_tokens,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=1.0)
    np.testing.assert_array_equal(out.tokens, batch["tokens"])
    np.testing.assert_array_equal(out.completion_mask, batch["loss_mask"][:, width:])
    # ... and their log-probs are the student's forward pass on the batch.
    logps = np.asarray(shifted_logprobs(state.params, STUDENT, batch)[0])[:, width - 1:]
    np.testing.assert_allclose(logps * out.completion_mask, out.logps, atol=2e-5)
    assert out.completion_mask.sum() > 0


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    vocab_dir = tmp_path / "tok"
    os.makedirs(vocab_dir)
    shutil.copy(os.path.join(ASSETS, "tokenizer_config.json"), vocab_dir)
    with open(os.path.join(ASSETS, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (40, 41)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(vocab_dir / "tokenizer.json", "w") as f:
        json.dump(spec, f)
    teacher = _write_teacher(tmp_path / "teacher", tokenizer_dir=str(vocab_dir))
    config = _config(teacher)
    with pytest.raises(ValueError, match="config.distill.teacher") as e:
        distill.setup(config, STUDENT, distill.spec(config), str(tmp_path))
    message = str(e.value)
    assert "student's vocabulary has 100 tokens, the teacher's 100" in message
    assert f"id 40 is {a!r} for the student and {b!r} for the teacher" in message
    config = _config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.distill.teacher"):
        distill.setup(config, STUDENT, distill.spec(config), "")


def _resume_config(teacher):
    config = _config(teacher, lmbda=0.5)
    config.optimizer.schedule = "constant"
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    return config


def test_stopped_and_restarted_run_equals_the_uninterrupted_one(teacher_dir, tmp_path):
    pattern = [True, False, True, False]  # on- and off-policy steps on both sides of the stop
    seed = next(s for s in range(50)
                if [distill.on_policy_at(s, k, 0.5) for k in range(4)] == pattern)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    for workdir, steps in ((full, 4), (split, 2), (split, 4)):
        config = _resume_config(teacher_dir)
        config.seed, config.train.num_steps = seed, steps
        run(config, workdir)
    want, got = read_metrics(full), read_metrics(split)
    assert [got[s]["distill/on_policy"] for s in (1, 2, 3, 4)] == [1.0, 0.0, 1.0, 0.0]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "num_tokens"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6,
                                       err_msg=f"step {step} {key}")
    assert got[3]["grad_norm"] > 0


def test_sharded_step_equals_single_device(teacher_dir):
    config = _config(teacher_dir, lmbda=0.0)
    results = []
    for shape, devices in (({"fsdp": 1}, jax.devices()[:1]),
                           ({"data": 2, "fsdp": 4}, jax.devices()[:8])):
        mesh = shd.make_mesh(shape, devices)
        spec, setup, optimizer, state, shardings = _setup_and_state(config, mesh)
        host = next(iter(setup.dataset(0, 1)))
        batch_sharding = shd.data_sharding(mesh, shd.DEFAULT_RULES)
        step = jax.jit(distill.make_step(config, STUDENT, spec, optimizer),
                       in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, shd.replicated(mesh)))
        with jax.set_mesh(mesh):
            state, metrics = step(state, {k: host[k] for k in distill.BATCH_KEYS})
        embed = state.frozen["teacher"]["embed"]
        shard = embed.addressable_shards[0].data.shape
        assert shard[1] == TEACHER.hidden_size // mesh.shape["fsdp"], shard  # sharded teacher
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m8, p8) = results
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p8, p1)


def test_distill_tiny_test_config_runs_end_to_end(tmp_path):
    workdir = str(tmp_path / "run")
    run_train(workdir, config="configs/distill_tiny.py:test", env=ENV)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert list(summary["stages"]) == ["teacher", "distill"]
    with open(os.path.join(workdir, "distill", "model_config.json")) as f:
        assert json.load(f)["hidden_size"] == 64  # the config's STUDENT_MODEL
    with open(os.path.join(workdir, "teacher", "model_config.json")) as f:
        assert json.load(f)["hidden_size"] == 128  # TEACHER_MODEL
    metrics = read_metrics(os.path.join(workdir, "distill"))
    assert {"loss", "grad_norm", "num_tokens", "distill/on_policy"} <= set(metrics[3])
    assert "gold_reward/greedy" in summary["stages"]["distill"]["final"]
