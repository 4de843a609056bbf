"""Reward, DPO and KTO steps on real preference batches from the data pipeline."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jalign.steps import decoder_logprob_fn, decoder_score_fn
from jalign import losses
from jalign import sharding as shd
from jalign.data import make_preference_dataset, preference_records_from_dicts
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn, sequence_scores
from jalign.models.transformer import Decoder, unembedding
from jalign.steps.preference import make_dpo_step, make_reward_step, reference_logps_fn
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer
from jalign.models import decoder_init_fn
from jalign.state import init_train_state

CFG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=48)
DPO_TOKEN_STATS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")


@functools.lru_cache(maxsize=None)
def _records():
    rows = get_task("sort").preference_pairs(64, seed=0)
    return preference_records_from_dicts(rows)[0]


def _batches(n, *, packing=False, batch_size=8, records=None):
    ds = make_preference_dataset(records or _records(), builtin_tokenizer(), batch_size=batch_size,
                                 max_length=48, seed=0, packing=packing, shuffle=False)
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _mesh(n=1):
    return shd.make_mesh({"fsdp": n}, jax.devices()[:n])


def _numpy_sequence_logps(params, batch):
    """Independent reference: full logits, per-row sums, rows 2i / 2i+1 (padded layout)."""
    hidden = Decoder(CFG).apply({"params": params}, batch["tokens"], batch["positions"],
                                batch["segment_ids"])
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(hidden[:, :-1] @ unembedding(params, CFG), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    return (tok * batch["loss_mask"][:, 1:]).sum(-1), batch["loss_mask"][:, 1:].sum(-1)


def test_dpo_step_matches_independent_sigmoid_dpo():
    opt = optax.sgd(0.0)
    state, _ = init_train_state(decoder_init_fn(CFG), opt, _mesh(), shd.DEFAULT_RULES, seed=0,
                                with_reference=True)
    # Make the policy differ from the reference so the loss is not log 2.
    state = state.replace(params=jax.tree.map(lambda p: p * 1.05, state.params))
    batch = _batches(1)[0]
    step = jax.jit(make_dpo_step(decoder_logprob_fn(CFG), opt, loss_fn=functools.partial(losses.dpo_loss, beta=0.1)))
    _, metrics = step(state, batch)
    pi, _ = _numpy_sequence_logps(state.params, batch)
    ref, _ = _numpy_sequence_logps(state.frozen["reference"], batch)
    z = 0.1 * ((pi[0::2] - ref[0::2]) - (pi[1::2] - ref[1::2]))
    want = np.mean(np.logaddexp(0.0, -z))
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)
    np.testing.assert_allclose(metrics["logps/chosen"], pi[0::2].mean(), rtol=1e-4)


def test_dpo_token_statistics_are_trls():
    """entropy over chosen and rejected completion tokens, mean_token_accuracy over chosen
    ones, logits/chosen and logits/rejected the mean of the full logits over the
    vocabulary and the completion tokens (TRL's DPOTrainer), from full float64 logits."""
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    opt = optax.sgd(0.0)
    state, _ = init_train_state(decoder_init_fn(cfg), opt, _mesh(), shd.DEFAULT_RULES, seed=0,
                                with_reference=True)
    batch = dict(_batches(1)[0])
    batch["pair_mask"] = np.asarray(batch["pair_mask"]).copy()
    batch["pair_mask"][-1] = 0  # a filler pair counts in no statistic
    completion = np.asarray(batch["loss_mask"][:, 1:]) > 0
    real_rows = np.repeat(np.asarray(batch["pair_mask"]) > 0, 2)[:, None]
    chosen_rows = (np.arange(completion.shape[0]) % 2 == 0)[:, None]
    chosen, rejected = completion & real_rows & chosen_rows, completion & real_rows & ~chosen_rows
    targets = np.asarray(batch["tokens"][:, 1:])

    def hidden_of(params):
        return np.asarray(Decoder(cfg).apply({"params": params}, batch["tokens"],
                                             batch["positions"], batch["segment_ids"])[:, :-1])

    # Make the most frequent chosen target the arg-max everywhere, so the accuracy is
    # its frequency (strictly between 0 and 1), not the 0 of a random model.
    common = np.bincount(targets[chosen]).argmax()
    h_mean = hidden_of(state.params)[chosen].mean(0)
    lm_head = state.params["lm_head"].at[:, common].add(3.0 * h_mean / (h_mean @ h_mean))
    state = state.replace(params=dict(state.params, lm_head=lm_head))
    step = jax.jit(make_dpo_step(decoder_logprob_fn(cfg, with_stats=True), opt,
                                 loss_fn=functools.partial(losses.dpo_loss, beta=0.1)))
    metrics = step(state, batch)[1]
    with jax.default_matmul_precision("highest"):
        logits = hidden_of(state.params).astype(np.float64) @ np.asarray(lm_head, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    entropy = -(np.exp(logp) * logp).sum(-1)
    argmax_hit = logits.argmax(-1) == targets
    want = {"entropy": entropy[chosen | rejected].mean(),
            "mean_token_accuracy": argmax_hit[chosen].mean(),
            "logits/chosen": logits.mean(-1)[chosen].mean(),
            "logits/rejected": logits.mean(-1)[rejected].mean()}
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    assert 0 < want["mean_token_accuracy"] < 1
    assert want["mean_token_accuracy"] != argmax_hit[chosen | rejected].mean()  # chosen only


def _loop_jitted(step_fn, mesh, shardings):
    """The step as jalign.loop jits it: shardings, donation, the non-finite guard."""
    from jalign.loop import skip_nonfinite
    return jax.jit(skip_nonfinite(step_fn),
                   in_shardings=(shardings, shd.data_sharding(mesh, shd.DEFAULT_RULES)),
                   out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_step_one_rewards_are_exactly_zero_when_policy_is_reference(kind):
    """Policy == reference (step 1): the implicit rewards are exactly 0, not +-1e-6 from two
    differently compiled forwards of the same model, and no pair counts as won."""
    from jalign.data import make_unpaired_dataset
    from jalign.steps.preference import make_kto_step
    # float32; sizes at which the two compiled forwards do differ (checked without the fix)
    cfg = ModelConfig(vocab_size=128, hidden_size=128, num_layers=4, num_heads=4,
                      num_kv_heads=2, intermediate_size=192)
    opt = optax.adamw(1e-2)
    mesh = _mesh()
    if kind == "dpo":
        step_fn = make_dpo_step(decoder_logprob_fn(cfg, with_stats=True), opt,
                                loss_fn=functools.partial(losses.dpo_loss, beta=0.5))
        batches = _batches(2)
        keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    else:
        step_fn = make_kto_step(decoder_logprob_fn(cfg), opt,
                                loss_fn=functools.partial(losses.kto_loss, beta=0.5))
        rows = get_task("sort").unpaired(32, seed=0)
        records = preference_records_from_dicts(rows, paired=False)[0]
        it = iter(make_unpaired_dataset(records, builtin_tokenizer(), batch_size=8, max_length=48,
                                        seed=0, shuffle=False))
        batches = [next(it), next(it)]
        keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")
    state, shardings = init_train_state(decoder_init_fn(cfg), opt, mesh, shd.DEFAULT_RULES,
                                        seed=0, with_reference=True)
    step = _loop_jitted(step_fn, mesh, shardings)
    with jax.set_mesh(mesh):
        state, first = step(state, batches[0])
        state, second = step(state, batches[1])
    for key in keys:
        if key in first:
            assert float(first[key]) == 0.0, (key, float(first[key]))
    if kind == "dpo":
        assert float(first["loss"]) == pytest.approx(np.log(2.0), rel=1e-7)
    # After an update the policy differs: the reference forward is used again.
    assert float(second["rewards/chosen"]) != 0.0


def test_policy_is_reference_sees_any_difference_and_lora_zero_adapters():
    from jalign.steps.preference import policy_is_reference
    opt = optax.sgd(0.0)
    state, _ = init_train_state(decoder_init_fn(CFG), opt, _mesh(), shd.DEFAULT_RULES, seed=0,
                                with_reference=True)
    assert bool(policy_is_reference(state))
    embed = state.params["embed"]
    nudged = dict(state.params, embed=embed.at[3, 5].set(np.nextafter(embed[3, 5], 1.0)))
    assert not bool(policy_is_reference(state.replace(params=nudged)))
    lora_cfg = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=48, lora_rank=4,
                           lora_base_dtype="float32")
    lstate, _ = init_train_state(decoder_init_fn(lora_cfg), opt, _mesh(), shd.DEFAULT_RULES,
                                 seed=0, model_cfg=lora_cfg)
    assert bool(policy_is_reference(lstate))  # B starts at zero: the adapters add nothing
    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1e-3 if str(path[-1]).endswith("_lora_b']") else x, lstate.params)
    assert not bool(policy_is_reference(lstate.replace(params=moved)))


def test_packed_and_padded_batches_give_the_same_pair_logps():
    params = jax.device_get(init_train_state(decoder_init_fn(CFG), optax.sgd(0.0), _mesh(),
                                             shd.DEFAULT_RULES, seed=0)[0].params)
    fn = jax.jit(reference_logps_fn(decoder_logprob_fn(CFG)))
    padded = {}
    for b in _batches(4):
        out = fn(params, b)
        for i, idx in enumerate(b["example_index"]):
            if idx >= 0:
                padded[int(idx)] = (float(out["ref_chosen_logps"][i]), float(out["ref_rejected_logps"][i]))
    packed = {}
    for b in _batches(6, packing=True):
        out = fn(params, b)
        for i, idx in enumerate(b["example_index"]):
            if idx >= 0:
                packed[int(idx)] = (float(out["ref_chosen_logps"][i]), float(out["ref_rejected_logps"][i]))
    common = sorted(set(padded) & set(packed))
    assert len(common) >= 16
    np.testing.assert_allclose([packed[i] for i in common], [padded[i] for i in common], rtol=1e-4)


def test_precomputed_reference_gives_the_same_trajectory():
    opt = optax.adamw(1e-2)
    loss_fn = functools.partial(losses.dpo_loss, beta=0.1)
    batches = _batches(4)
    state, _ = init_train_state(decoder_init_fn(CFG), opt, _mesh(), shd.DEFAULT_RULES, seed=0,
                                with_reference=True)
    ref_fn = jax.jit(reference_logps_fn(decoder_logprob_fn(CFG)))
    pre = [dict(b, **jax.device_get(ref_fn(state.params, b))) for b in batches]
    online = jax.jit(make_dpo_step(decoder_logprob_fn(CFG), opt, loss_fn=loss_fn, reference="params"))
    offline = jax.jit(make_dpo_step(decoder_logprob_fn(CFG), opt, loss_fn=loss_fn, reference="precomputed"))
    s1, s2 = state, state.replace(frozen=None)
    for b_online, b_pre in zip(batches, pre):
        s1, m1 = online(s1, b_online)
        s2, m2 = offline(s2, b_pre)
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    # Step 1 differs in the last bits by design: the online reference is the policy itself
    # (rewards exactly 0), the precomputed one a separate program's (~1e-6 off); Adam
    # turns that into ~1e-6 on a few near-zero-gradient weights. Each update moves them ~1e-2.
    chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-5, atol=1e-5)
    assert float(m1["rewards/margins"]) > 0  # it learned something


def test_reward_step_reads_last_token_and_learns():
    opt = optax.adam(3e-3)
    state, _ = init_train_state(scalar_model_init_fn(CFG), opt, _mesh(), shd.DEFAULT_RULES, seed=0)
    step = jax.jit(make_reward_step(decoder_score_fn(CFG), opt, loss_fn=losses.reward_loss))
    batch = _batches(1)[0]
    first = None
    for _ in range(60):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < first * 0.3
    assert float(metrics["accuracy"]) == 1.0


def test_scores_are_read_at_each_sequence_last_token():
    params = init_train_state(scalar_model_init_fn(CFG), optax.sgd(0.0), _mesh(),
                              shd.DEFAULT_RULES, seed=0)[0].params
    params = dict(params, score_head=jnp.ones((CFG.hidden_size,)))
    batch = _batches(1)[0]
    n = 2 * batch["pair_mask"].shape[0]
    base = np.asarray(sequence_scores(params, CFG, batch, n))
    row = 0
    length = int((batch["segment_ids"][row] > 0).sum())
    padded = {k: v.copy() for k, v in batch.items()}
    if length < padded["tokens"].shape[1]:  # a padding token after the end changes nothing
        padded["tokens"][row, length] = 5
        np.testing.assert_allclose(sequence_scores(params, CFG, padded, n), base, rtol=1e-6)
    last = {k: v.copy() for k, v in batch.items()}
    last["tokens"][row, length - 1] = (last["tokens"][row, length - 1] + 1) % 90 + 4
    changed = np.asarray(sequence_scores(params, CFG, last, n))
    assert changed[0] != base[0]
    np.testing.assert_allclose(changed[1:], base[1:], rtol=1e-6)


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "fsdp": 4}])  # fsdp=8: the PPO test
def test_dpo_step_sharded_equals_single_device(mesh_shape):
    opt = optax.sgd(1.0)
    batch = _batches(1)[0]
    loss_fn = functools.partial(losses.dpo_loss, beta=0.1)
    results = []
    for shape, n in ((({"fsdp": 1}), 1), (mesh_shape, 8)):
        mesh = shd.make_mesh(shape, jax.devices()[:n])
        state, shardings = init_train_state(decoder_init_fn(CFG), opt, mesh, shd.DEFAULT_RULES,
                                            seed=0, with_reference=True)
        state = state.replace(params=jax.tree.map(lambda p: p * 1.05, state.params))
        old = jax.device_get(state.params)
        ds = shd.data_sharding(mesh, shd.DEFAULT_RULES)
        step = jax.jit(make_dpo_step(decoder_logprob_fn(CFG), opt, loss_fn=loss_fn),
                       in_shardings=(shardings, ds), out_shardings=(shardings, shd.replicated(mesh)))
        with jax.set_mesh(mesh):
            new, metrics = step(state, jax.device_put(batch, ds))
        results.append((jax.device_get(metrics),
                        jax.tree.map(lambda a, b: a - b, old, jax.device_get(new.params))))
    (m1, g1), (m8, g8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    # The update is read back as old - new from parameters of magnitude ~1, whose float32
    # spacing is 1.2e-7: one rounding of a differently ordered sum shows as one spacing
    # (CI saw exactly 1.19e-7 on one element), so atol is a few spacings, not below one.
    chex.assert_trees_all_close(g1, g8, rtol=1e-5, atol=5e-7)


def test_tr_dpo_syncs_the_reference_every_n_steps():
    opt = optax.sgd(1e-2)
    state, _ = init_train_state(decoder_init_fn(CFG), opt, _mesh(), shd.DEFAULT_RULES, seed=0,
                                with_reference=True)
    step = jax.jit(make_dpo_step(decoder_logprob_fn(CFG), opt, loss_fn=functools.partial(losses.dpo_loss, beta=0.1),
                                 ref_sync_every=2, ref_sync_mixup=0.5))
    batch = _batches(1)[0]
    ref0 = state.frozen["reference"]
    s1, _ = step(state, batch)            # step 1: no sync
    chex.assert_trees_all_close(s1.frozen["reference"], ref0)
    s2, _ = step(s1, batch)               # step 2: reference = 0.5 policy + 0.5 reference
    want = jax.tree.map(lambda p, r: 0.5 * p + 0.5 * r, s2.params, s1.frozen["reference"])
    chex.assert_trees_all_close(s2.frozen["reference"], want, rtol=1e-6)
    assert not np.allclose(np.asarray(s2.frozen["reference"]["embed"]), np.asarray(ref0["embed"]))


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_gradient_accumulation_over_pairs_equals_the_full_batch(kind):
    opt = optax.sgd(0.5)
    if kind == "dpo":
        init = decoder_init_fn(CFG)
        make = functools.partial(make_dpo_step, decoder_logprob_fn(CFG, with_stats=True), opt,
                                 loss_fn=functools.partial(losses.dpo_loss, beta=0.1))
    else:
        init = scalar_model_init_fn(CFG)
        make = functools.partial(make_reward_step, decoder_score_fn(CFG), opt, loss_fn=losses.reward_loss)
    state, _ = init_train_state(init, opt, _mesh(), shd.DEFAULT_RULES, seed=0,
                                with_reference=kind == "dpo")
    state = state.replace(params=jax.tree.map(lambda p: p * 1.05, state.params))
    batch = dict(_batches(1)[0])
    batch["pair_mask"] = np.asarray(batch["pair_mask"]).copy()
    batch["pair_mask"][-1] = 0  # a filler pair: weights must follow the real pairs
    one, m1 = jax.jit(make())(state, batch)
    four, m4 = jax.jit(make(grad_accum_steps=4))(state, batch)
    keys = ("loss", "grad_norm") + (DPO_TOKEN_STATS + ("rewards/accuracies",) if kind == "dpo"
                                     else ("accuracy",))
    for key in keys:  # token means over the whole batch, not means of microbatch means
        np.testing.assert_allclose(m4[key], m1[key], rtol=2e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                 four.params, one.params)
    with pytest.raises(ValueError, match="padded batches"):
        jax.jit(make(grad_accum_steps=2))(state, _batches(1, packing=True)[0])


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_packed_and_padded_batches_of_the_same_pairs_give_the_same_metrics(kind):
    # Two packed rows hold fewer pairs than the 8 slots, so the packed batch has filler
    # slots (pair_mask 0) that must not count in any metric.
    packed = _batches(1, packing=True, batch_size=8)[0]
    real = np.asarray(packed["pair_mask"]) > 0
    assert 0 < real.sum() < real.size
    ids = np.asarray(packed["example_index"])[real]
    records = [dict(_records()[i], _index=int(i)) for i in ids]
    padded = _batches(1, batch_size=len(records), records=records)[0]
    np.testing.assert_array_equal(padded["example_index"], ids)
    opt = optax.sgd(0.0)
    if kind == "dpo":
        init, loss_fn = decoder_init_fn(CFG), functools.partial(losses.dpo_loss, beta=0.1)
        make = functools.partial(make_dpo_step, decoder_logprob_fn(CFG, with_stats=True), opt,
                                 loss_fn=loss_fn)
        keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                "rewards/rejected", "logps/chosen", "logps/rejected") + DPO_TOKEN_STATS
    else:
        init, make = scalar_model_init_fn(CFG), functools.partial(
            make_reward_step, decoder_score_fn(CFG), opt, loss_fn=losses.reward_loss)
        keys = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")
    state, _ = init_train_state(init, opt, _mesh(), shd.DEFAULT_RULES, seed=0,
                                with_reference=kind == "dpo")
    # A policy unlike its reference (DPO) and a non-zero score head (reward): metrics move.
    state = state.replace(params=jax.tree.map(lambda p: p * 1.05 + 0.01, state.params))
    step = jax.jit(make())
    m_packed, m_padded = step(state, packed)[1], step(state, padded)[1]
    for key in keys:
        np.testing.assert_allclose(m_packed[key], m_padded[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def test_orpo_nll_over_prompt_and_completion_is_trls_form():
    opt = optax.sgd(0.0)
    state, _ = init_train_state(decoder_init_fn(CFG), opt, _mesh(), shd.DEFAULT_RULES, seed=0)
    batch = _batches(1)[0]

    def orpo(c, r, ref_c, ref_r, **kwargs):
        del ref_c, ref_r
        return losses.orpo_loss(c, r, beta=0.1, **kwargs)

    metrics = {flag: jax.jit(make_dpo_step(decoder_logprob_fn(CFG), opt, loss_fn=orpo,
                                           reference="none", nll_over_prompt=flag))(state, batch)[1]
               for flag in (False, True)}
    hidden = Decoder(CFG).apply({"params": state.params}, batch["tokens"], batch["positions"],
                                batch["segment_ids"])
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(hidden[:, :-1] @ unembedding(state.params, CFG), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0][0::2]
    every = (batch["segment_ids"][0::2, 1:] > 0)           # prompt and completion tokens
    completion = batch["loss_mask"][0::2, 1:] > 0
    np.testing.assert_allclose(metrics[True]["nll_loss"], -tok[every].sum() / every.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics[False]["nll_loss"], -tok[completion].sum() / completion.sum(),
                               rtol=1e-5)
