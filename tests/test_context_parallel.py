"""Context parallelism: a "sequence" mesh axis splits every row's tokens across devices.

SFT and DPO steps on 8 devices, sequence=4 x fsdp=2, equal one device (loss and
gradients, float32), with packed segments that cross the shard boundaries, sliding
layers and chunked attention tiles that leave a shard's queries padded; a run
resumed on another sequence size equals the uninterrupted one; the options that
cannot attend across the axis are refused at config time.
"""

import functools
import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jalign import losses
from jalign import sharding as shd
from jalign.config_utils import base_config, validate_config
from jalign.data import make_preference_dataset, preference_records_from_dicts
from jalign.loop import run
from jalign.models import decoder_init_fn
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder
from jalign.state import init_train_state
from jalign.steps import decoder_logprob_fn
from jalign.steps.preference import make_dpo_step
from jalign.steps.sft import make_sft_step
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer
from tests.train_helpers import load_config

CP_MESH = {"fsdp": 2, "sequence": 4}
# Sliding and full layers (the window is a traced choice in the scanned stack), and
# chunked tiles of 12 queries: a shard's 16 queries are padded to 48, rows that see
# no key on the early shards.
CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48, sliding_window=20,
                  layer_types=("sliding_attention", "full_attention"),
                  attention_impl="chunked", attention_block_q=12, attention_block_kv=16)


def _grad_recorder():
    """An 'optimizer' that leaves params alone and keeps the last gradients as its state."""
    return optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _packed_sft_batch(rows=4, t=64, seed=0):
    """Rows packed with segments of 5-29 tokens (and trailing padding), so segments
    cross the shard boundaries at tokens 16, 32 and 48."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG.vocab_size, (rows, t)).astype(np.int32)
    segments = np.zeros((rows, t), np.int32)
    positions = np.zeros((rows, t), np.int32)
    loss_mask = np.zeros((rows, t), np.int32)
    for r in range(rows):
        start, seg = 0, 1
        while start < t - 6:
            length = min(int(rng.integers(5, 30)), t - 3 - start)
            segments[r, start:start + length] = seg
            positions[r, start:start + length] = np.arange(length)
            loss_mask[r, start + length // 2:start + length] = 1  # the completion
            start, seg = start + length, seg + 1
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segments,
            "positions": positions}


def _crosses_a_shard_boundary(segment_ids, shards):
    t = segment_ids.shape[1]
    edges = [k * t // shards for k in range(1, shards)]
    return any(((segment_ids[:, e - 1] == segment_ids[:, e]) & (segment_ids[:, e] > 0)).any()
               for e in edges)


def _step_on(mesh_shape, n_devices, model_cfg, make_step, batch, *, with_reference=False):
    """(metrics, gradients) of one step on a mesh, as the loop runs it (its rules)."""
    mesh = shd.make_mesh(mesh_shape, jax.devices()[:n_devices])
    opt = _grad_recorder()
    state, shardings = init_train_state(decoder_init_fn(model_cfg), opt, mesh, shd.DEFAULT_RULES,
                                        seed=0, with_reference=with_reference)
    if with_reference:  # the policy moves off the reference: non-zero DPO gradients
        state = state.replace(params=jax.tree.map(lambda p: p * 1.05, state.params))
    rows = shd.data_sharding(mesh, shd.DEFAULT_RULES)
    step = jax.jit(make_step(opt), in_shardings=(shardings, rows),
                   out_shardings=(shardings, shd.replicated(mesh)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        new_state, metrics = step(state, jax.device_put(batch, rows))
    return jax.device_get(metrics), jax.device_get(new_state.opt_state)


def _assert_equal(one, many, keys):
    (m1, g1), (m8, g8) = one, many
    for key in keys:
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    chex.assert_trees_all_close(g8, g1, rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-3  # really trains


def test_sft_step_on_sequence4_fsdp2_equals_one_device():
    batch = _packed_sft_batch()
    assert _crosses_a_shard_boundary(batch["segment_ids"], CP_MESH["sequence"])
    make = lambda opt: make_sft_step(decoder_logprob_fn(CFG, with_stats=True), opt)  # noqa: E731
    one = _step_on({"fsdp": 1}, 1, CFG, make, batch)
    many = _step_on(CP_MESH, 8, CFG, make, batch)
    _assert_equal(one, many, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def test_hidden_states_are_split_along_tokens():
    """Under the loop's rules the decoder's activations lie token-sharded over "sequence"
    (their values are checked through the steps above)."""
    batch = _packed_sft_batch(rows=2, t=32, seed=1)
    mesh = shd.make_mesh(CP_MESH, jax.devices()[:8])
    state, _ = init_train_state(decoder_init_fn(CFG), optax.sgd(0.0), mesh, shd.DEFAULT_RULES,
                                seed=0)
    fn = jax.jit(lambda p, b: Decoder(CFG).apply({"params": p}, b["tokens"], b["positions"],
                                                 b["segment_ids"]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        hidden = fn(state.params, jax.device_put(batch, shd.data_sharding(mesh, shd.DEFAULT_RULES)))
    assert hidden.sharding.spec[:2] == ("fsdp", "sequence")
    assert hidden.addressable_shards[0].data.shape == (1, 8, CFG.hidden_size)


def test_dpo_step_on_sequence4_fsdp2_equals_one_device():
    """Packed pairs through the data pipeline; xla attention (what "auto" picks on CPU)."""
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=48, attention_impl="auto")
    records = preference_records_from_dicts(get_task("sort").preference_pairs(16, seed=0))[0]
    ds = make_preference_dataset(records, builtin_tokenizer(), batch_size=8, max_length=48,
                                 seed=0, packing=True, shuffle=False)
    batch = next(iter(ds))
    assert batch["tokens"].shape[1] % CP_MESH["sequence"] == 0
    assert _crosses_a_shard_boundary(np.asarray(batch["segment_ids"]), CP_MESH["sequence"])
    loss_fn = functools.partial(losses.dpo_loss, beta=0.1)
    make = lambda opt: make_dpo_step(decoder_logprob_fn(cfg), opt, loss_fn=loss_fn)  # noqa: E731
    one = _step_on({"fsdp": 1}, 1, cfg, make, batch, with_reference=True)
    many = _step_on(CP_MESH, 8, cfg, make, batch, with_reference=True)
    _assert_equal(one, many, ("loss", "grad_norm", "rewards/margins", "logps/chosen"))


def test_options_that_cannot_split_tokens_are_refused_at_config_time():
    config = base_config()
    config.algo = "sft"
    config.mesh.sequence = 2
    validate_config(config)  # "auto" resolves among the options that can
    config.model.dtype = "bfloat16"  # what cudnn needs besides
    for impl in ("splash", "cudnn"):
        config.model.attention_impl = impl
        with pytest.raises(ValueError,
                           match=r"config\.mesh\.sequence.*config\.model\.attention_impl"):
            validate_config(config)
    mesh = shd.make_mesh({"fsdp": 2, "sequence": 4}, jax.devices()[:8])
    rules = tuple(r for r in shd.DEFAULT_RULES if r[0] != "length") + (("length", None),)
    with pytest.raises(ValueError, match="config.logical_axis_rules maps 'length'"):
        shd.check_context_parallel(mesh, rules)


def _sft_config(num_steps, sequence):
    config = load_config("quickstart", "sft,test")
    config.optimizer.schedule = "constant"
    config.train.num_steps = num_steps
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 2
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.eval_at_start = False
    config.train.memory_report = False
    config.mesh.sequence = sequence
    return config


def test_resume_on_another_sequence_size_equals_the_uninterrupted_run(tmp_path, capsys):
    """Parameters are not split over "sequence", so a checkpoint of a sequence=2 run
    restores onto a sequence=4 mesh (Orbax reads into the new shardings)."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run(_sft_config(4, sequence=2), full)
    # The first two steps of that run, on sequence=2, are the interrupted run.
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    shutil.rmtree(os.path.join(resumed, "final_params"))
    run(_sft_config(4, sequence=4), resumed)
    assert "Resumed from" in capsys.readouterr().out

    def metrics(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return {r["step"]: r for r in map(json.loads, f)}

    want, got = metrics(full), metrics(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5,
                                       err_msg=f"step {step} {key}")
