"""dpo_loss against NumPy formulas written from the papers / TRL, for every loss_type."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jalign.losses import F_DIVERGENCE_LOSS_TYPES, LOSS_TYPES, dpo_loss, f_divergence_scores

# ---------------------------------------------------------------- NumPy side


def make_batch(seed, dtype, *, batch=8, spread=3.0):
    """Random preference batch: (jax kwargs, float64 numpy copies of the same values)."""
    rng = np.random.default_rng(seed)
    ref_c = -rng.uniform(5.0, 60.0, batch)
    ref_r = -rng.uniform(5.0, 60.0, batch)
    raw = {"chosen_logps": ref_c + rng.normal(0.0, spread, batch),
           "rejected_logps": ref_r + rng.normal(0.0, spread, batch),
           "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    jx = {k: jnp.asarray(v, jnp.float32).astype(dtype) for k, v in raw.items()}
    # NumPy sees exactly the (possibly bf16-rounded) values that JAX sees.
    npx = {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in jx.items()}
    lengths = {"chosen_lengths": rng.integers(0, 40, batch),  # 0: the clamp at 1
               "rejected_lengths": rng.integers(1, 40, batch)}
    jx.update({k: jnp.asarray(v) for k, v in lengths.items()})
    npx.update({k: v.astype(np.float64) for k, v in lengths.items()})
    return jx, npx


def ls(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def score(u, f_divergence, a):
    """f'(e^u) with its constants, as TRL 1.16's DPOTrainer computes the scores."""
    if f_divergence == "reverse_kl":
        return u
    if f_divergence == "forward_kl":
        return 1.0 - np.exp(-u)
    if f_divergence == "js_divergence":
        return np.log(2.0) + ls(u)
    return (np.exp((a - 1.0) * u) - 1.0) / (a - 1.0)


def np_dpo(name, x, *, beta=0.1, eps=0.0, f_divergence="reverse_kl", a=0.5, tau=0.05):
    pc, pr = x["chosen_logps"], x["rejected_logps"]
    rc, rr = x["ref_chosen_logps"], x["ref_rejected_logps"]
    lc, lr = np.maximum(x["chosen_lengths"], 1), np.maximum(x["rejected_lengths"], 1)
    uc, ur = pc - rc, pr - rr
    sc, sr = score(uc, f_divergence, a), score(ur, f_divergence, a)
    z = beta * (sc - sr)
    if name == "sigmoid":
        return -ls(z)
    if name == "hinge":
        return np.maximum(0.0, 1.0 - z)
    if name == "ipo":
        return (sc / lc - sr / lr - 1.0 / (2.0 * beta)) ** 2
    if name == "sigmoid_norm":
        return -ls(beta * (sc / lc - sr / lr))
    if name == "exo_pair":
        return sig(z) * (ls(z) - np.log(1 - eps)) + sig(-z) * (ls(-z) - np.log(eps))
    if name == "nca_pair":
        return -ls(beta * uc) - 0.5 * ls(-beta * uc) - 0.5 * ls(-beta * ur)
    if name == "robust":
        return ((1 - eps) * -ls(z) - eps * -ls(-z)) / (1 - 2 * eps)
    if name == "bco_pair":
        return -ls(beta * uc) - ls(-beta * ur)
    if name == "sppo_hard":
        return (uc - 1 / (2 * beta)) ** 2 + (ur + 1 / (2 * beta)) ** 2
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            d = np.sort(pc - pr) - np.sort(rc - rr)
        else:
            d = np.sort(uc) - np.sort(ur)
        return -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    if name == "apo_zero":
        return (1 - sig(beta * uc)) + sig(beta * ur)
    if name == "apo_down":
        return sig(beta * uc) + (1 - sig(beta * (uc - ur)))
    if name == "discopop":
        m = sig(z / tau)
        return (1 - m) * -ls(z) + m * np.exp(-z)
    if name == "sft":
        # TRL: token mean over all chosen tokens; an empty completion adds no tokens.
        return np.full_like(pc, -pc.sum() / x["chosen_lengths"].sum())
    raise KeyError(name)


def np_metrics(x, beta):
    rew_c = beta * (x["chosen_logps"] - x["ref_chosen_logps"])
    rew_r = beta * (x["rejected_logps"] - x["ref_rejected_logps"])
    return {"rewards/chosen": rew_c.mean(), "rewards/rejected": rew_r.mean(),
            "rewards/accuracies": (rew_c > rew_r).mean(),
            "rewards/margins": (rew_c - rew_r).mean(),
            "logps/chosen": x["chosen_logps"].mean(), "logps/rejected": x["rejected_logps"].mean()}


TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=1e-3, atol=1e-3)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _eps_for(name):
    return {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(name, 0.0)


# ---------------------------------------------------------------- JAX vs NumPy


class DpoLossVsNumpyTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(loss_type=LOSS_TYPES, dtype=("float32", "bfloat16"))
    def test_loss_type(self, loss_type, dtype):
        eps = _eps_for(loss_type)
        jx, npx = make_batch(LOSS_TYPES.index(loss_type), DTYPES[dtype])
        fn = self.variant(functools.partial(dpo_loss, loss_type=loss_type, beta=0.1,
                                            label_smoothing=eps))
        losses, metrics = fn(**jx)
        chex.assert_shape(losses, (8,))
        chex.assert_type(losses, jnp.float32)  # upcast even from bfloat16
        np.testing.assert_allclose(losses, np_dpo(loss_type, npx, beta=0.1, eps=eps),
                                   **TOL[dtype])
        expected = np_metrics(npx, 0.1)
        self.assertEqual(set(metrics), set(expected))
        for key, value in expected.items():
            chex.assert_shape(metrics[key], ())
            chex.assert_type(metrics[key], jnp.float32)
            np.testing.assert_allclose(metrics[key], value, **TOL[dtype], err_msg=key)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(f_divergence=("forward_kl", "js_divergence", "alpha_divergence"),
                           dtype=("float32", "bfloat16"))
    def test_f_divergences(self, f_divergence, dtype):
        # Small log-ratios keep exp(-u) moderate, so float32 round-off stays small.
        jx, npx = make_batch(100, DTYPES[dtype], spread=1.0)
        for loss_type in F_DIVERGENCE_LOSS_TYPES:
            eps = _eps_for(loss_type)
            for f_alpha in ((0.5, 0.25) if f_divergence == "alpha_divergence" else (0.5,)):
                fn = self.variant(functools.partial(
                    dpo_loss, loss_type=loss_type, beta=0.3, label_smoothing=eps,
                    f_divergence=f_divergence, f_alpha=f_alpha))
                losses, _ = fn(**jx)
                expected = np_dpo(loss_type, npx, beta=0.3, eps=eps, f_divergence=f_divergence,
                                  a=f_alpha)
                np.testing.assert_allclose(losses, expected, **TOL[dtype],
                                           err_msg=f"{loss_type} {f_divergence} {f_alpha}")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("float32", "bfloat16")
    def test_mpo_mix_and_weights(self, dtype):
        jx, npx = make_batch(7, DTYPES[dtype])
        weights = jnp.linspace(0.2, 1.5, 8)
        fn = self.variant(functools.partial(
            dpo_loss, loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0)))
        losses, _ = fn(**jx, weights=weights)
        expected = (0.8 * np_dpo("sigmoid", npx) + 0.2 * np_dpo("bco_pair", npx)
                    + 1.0 * np_dpo("sft", npx)) * np.asarray(weights, np.float64)
        np.testing.assert_allclose(losses, expected, **TOL[dtype])

    @chex.variants(with_jit=True, without_jit=True)
    def test_sft_with_explicit_nll(self):
        jx, npx = make_batch(8, jnp.float32)
        nll = jnp.arange(8.0) / 4
        fn = self.variant(functools.partial(dpo_loss, loss_type=("sigmoid", "sft")))
        losses, _ = fn(**{k: v for k, v in jx.items() if "lengths" not in k}, chosen_nll=nll)
        np.testing.assert_allclose(losses, np_dpo("sigmoid", npx) + np.arange(8.0) / 4,
                                   rtol=1e-5, atol=1e-5)


def score_slope(u, f_divergence, a):
    """ds/du of `score`: the constants drop out here, but not from the loss's value."""
    if f_divergence == "reverse_kl":
        return np.ones_like(u)
    if f_divergence == "forward_kl":
        return np.exp(-u)
    if f_divergence == "js_divergence":
        return sig(-u)
    return np.exp((a - 1.0) * u)


@pytest.mark.parametrize("f_divergence, f_alpha", [
    ("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5),
    ("alpha_divergence", 0.5), ("alpha_divergence", 0.25)])
@pytest.mark.parametrize("loss_type", ("ipo", "sigmoid_norm"))
def test_length_normalised_f_divergence_keeps_constants(loss_type, f_divergence, f_alpha):
    # TRL 1.16 divides the full scores f'(e^u) by their lengths: with L_c != L_r a constant
    # c of f' adds c (1/L_c - 1/L_r) to the normalised margin. Value and gradient against
    # a float64 transcription with the constants kept.
    beta = 0.3
    jx, npx = make_batch(11, jnp.float32, spread=1.0)
    lc = np.maximum(npx["chosen_lengths"], 1.0)
    lr = np.maximum(npx["rejected_lengths"], 1.0)
    assert np.all(lc != lr)
    uc = npx["chosen_logps"] - npx["ref_chosen_logps"]
    ur = npx["rejected_logps"] - npx["ref_rejected_logps"]
    delta = score(uc, f_divergence, f_alpha) / lc - score(ur, f_divergence, f_alpha) / lr
    if loss_type == "ipo":
        expected = (delta - 1.0 / (2.0 * beta)) ** 2
        dloss_ddelta = 2.0 * (delta - 1.0 / (2.0 * beta))
    else:
        expected = -ls(beta * delta)
        dloss_ddelta = -beta * sig(-beta * delta)
    # d(mean loss)/d logp_c = dloss/ddelta * s'(u_c) / L_c / B, and minus that for rejected.
    n = len(uc)
    expected_g_c = dloss_ddelta * score_slope(uc, f_divergence, f_alpha) / lc / n
    expected_g_r = -dloss_ddelta * score_slope(ur, f_divergence, f_alpha) / lr / n

    def mean_loss(c, r):
        losses, _ = dpo_loss(c, r, jx["ref_chosen_logps"], jx["ref_rejected_logps"],
                             loss_type=loss_type, beta=beta, f_divergence=f_divergence,
                             f_alpha=f_alpha, chosen_lengths=jx["chosen_lengths"],
                             rejected_lengths=jx["rejected_lengths"])
        return losses.mean(), losses

    (_, losses), (g_c, g_r) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
        jx["chosen_logps"], jx["rejected_logps"])
    np.testing.assert_allclose(losses, expected, **TOL["float32"])
    np.testing.assert_allclose(g_c, expected_g_c, **TOL["float32"])
    np.testing.assert_allclose(g_r, expected_g_r, **TOL["float32"])


def test_f_divergence_scores_are_trl_scores():
    u = jnp.array([-2.0, -0.3, 0.0, 0.7, 3.0])
    un = np.asarray(u, np.float64)
    for f_divergence, f_alpha in [("reverse_kl", 0.5), ("forward_kl", 0.5),
                                  ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                  ("alpha_divergence", 0.25)]:
        np.testing.assert_allclose(
            f_divergence_scores(u, f_divergence=f_divergence, f_alpha=f_alpha),
            score(un, f_divergence, f_alpha), rtol=1e-6, atol=1e-6, err_msg=f_divergence)


# ---------------------------------------------------------------- invariants

EXPECTED_AT_REFERENCE = {
    "sigmoid": np.log(2), "robust": np.log(2), "aot": np.log(2), "aot_unpaired": np.log(2),
    "sigmoid_norm": np.log(2), "hinge": 1.0, "ipo": 25.0, "sppo_hard": 50.0,
    "nca_pair": 2 * np.log(2), "bco_pair": 2 * np.log(2), "apo_zero": 1.0, "apo_down": 1.0,
    "discopop": 0.5 * np.log(2) + 0.5,  # ~0.8466
}


@pytest.mark.parametrize("loss_type", sorted(EXPECTED_AT_REFERENCE))
def test_policy_equals_reference(loss_type):
    rng = np.random.default_rng(0)
    logps_c, logps_r = -rng.uniform(5, 50, 6), -rng.uniform(5, 50, 6)
    # robust / aot with eps > 0 must still give log 2 at D = 0.
    eps = 0.2 if loss_type in ("robust", "aot", "aot_unpaired") else 0.0
    losses, metrics = dpo_loss(logps_c, logps_r, logps_c, logps_r, loss_type=loss_type,
                               beta=0.1, label_smoothing=eps,
                               chosen_lengths=rng.integers(1, 30, 6),
                               rejected_lengths=rng.integers(1, 30, 6))
    np.testing.assert_allclose(losses, EXPECTED_AT_REFERENCE[loss_type], rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0


def test_discopop_reference_value():
    losses, _ = dpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2),
                         loss_type="discopop")
    np.testing.assert_allclose(losses, 0.8466, atol=1e-4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("sign", (1.0, -1.0))
def test_large_margins_finite(loss_type, sign):
    # |beta D| = 1e4: no overflow in exp, no 0 * inf.
    b = 4
    chosen = jnp.full((b,), -10.0)
    rejected = jnp.full((b,), -10.0 - sign * 1e5)
    ref = jnp.full((b,), -10.0)
    lengths = jnp.full((b,), 7)

    def total(c, r):
        losses, _ = dpo_loss(c, r, ref, ref, loss_type=loss_type, beta=0.1,
                             label_smoothing=_eps_for(loss_type), chosen_lengths=lengths,
                             rejected_lengths=lengths)
        return losses.mean()

    value, grads = jax.value_and_grad(total, argnums=(0, 1))(chosen, rejected)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("f_divergence", ("forward_kl", "alpha_divergence"))
def test_f_divergence_exponent_is_capped(f_divergence):
    # exp(-u) at u = -1000 overflows float32 without the cap.
    c = jnp.array([-1000.0, 5.0])
    losses, _ = dpo_loss(c, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), loss_type="sigmoid",
                         f_divergence=f_divergence, f_alpha=0.5)
    grads = jax.grad(lambda c: dpo_loss(c, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2),
                                        f_divergence=f_divergence)[0].sum())(c)
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(grads))


def test_sigmoid_gradient_direction_and_value():
    # d/d logp_c of -ls(beta D) is -beta sigmoid(-beta D): raises chosen, lowers rejected.
    c, r, rc, rr = (jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]), jnp.array([-4.5]))
    g_c, g_r = jax.grad(lambda c, r: dpo_loss(c, r, rc, rr, beta=0.5)[0].sum(),
                        argnums=(0, 1))(c, r)
    d = (-3.0 + 4.0) - (-5.0 + 4.5)
    np.testing.assert_allclose(g_c, -0.5 * sig(-0.5 * d), rtol=1e-6)
    np.testing.assert_allclose(g_r, 0.5 * sig(-0.5 * d), rtol=1e-6)


def test_weights_carry_no_gradient():
    z = jnp.zeros(3)
    g = jax.grad(lambda w: dpo_loss(z - 1, z - 2, z, z, weights=w)[0].sum())(jnp.ones(3))
    np.testing.assert_array_equal(g, 0.0)


def test_alpha_divergence_at_one_is_reverse_kl():
    jx, _ = make_batch(3, jnp.float32)
    a, _ = dpo_loss(**jx, f_divergence="alpha_divergence", f_alpha=1.0)
    b, _ = dpo_loss(**jx)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- errors


def _call(**kwargs):
    z = jnp.zeros(4)
    return dpo_loss(z, z, z, z, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="kto_pair"), r"Unknown loss_type 'kto_pair'.*sigmoid, hinge, ipo"),
    (dict(loss_type=("sigmoid", "nope")), r"Unknown loss_type 'nope'.*valid choices"),
    (dict(loss_type=()), r"loss_type is empty.*valid choices"),
    (dict(f_divergence="chi2"), r"Unknown f_divergence 'chi2'.*reverse_kl, forward_kl"),
    (dict(loss_type="exo_pair"), r"exo_pair.*label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), r"robust.*label_smoothing < 0.5"),
    (dict(loss_type="bco_pair", f_divergence="js_divergence"),
     r"not supported by loss_type bco_pair.*sigmoid, sigmoid_norm, hinge"),
    (dict(loss_type=("sigmoid", "aot"), f_divergence="forward_kl"),
     r"not supported by loss_type aot"),
    (dict(loss_type="ipo"), r"length-normalised.*chosen_lengths.*ipo, sigmoid_norm"),
    (dict(loss_type="sigmoid_norm", chosen_lengths=jnp.ones(4)), r"rejected_lengths"),
    (dict(loss_type="sft"), r"sft.*chosen_nll"),
    (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)),
     r"loss_weights has 1 entries but loss_type has 2"),
    (dict(loss_type="aot", weights=jnp.ones(4)), r"weights= cannot be used with.*aot"),
])
def test_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)
