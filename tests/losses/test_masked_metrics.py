"""`mask=` of the preference losses: filler pairs of a packed batch change no metric.

Every loss is called twice: on a batch with filler rows (log-probs 0, length 1, as the
DPO step feeds them) with `mask=`, and without a mask on the real rows alone. Metrics must
agree, and so must the losses of the real rows (batch-level terms such as the sft NLL
count real rows only).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jalign.losses import (CPO_LOSS_TYPES, LOSS_TYPES, cpo_loss, dpo_loss, kto_loss,
                           kto_reference_point, orpo_loss, rdpo_loss, reward_loss, simpo_loss)

REAL = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], bool)  # filler in the middle and at the end
SORTING = ("aot", "aot_unpaired")  # rank-matched: compare the mean over real rows


def _batch(seed):
    """Full-batch arrays (filler rows zeroed) and the real rows alone."""
    rng = np.random.default_rng(seed)
    b = len(REAL)
    ref_c, ref_r = -rng.uniform(5, 60, b), -rng.uniform(5, 60, b)
    raw = {
        "chosen_logps": ref_c + rng.normal(0, 3, b), "rejected_logps": ref_r + rng.normal(0, 3, b),
        "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r,
        "chosen_lengths": rng.integers(1, 40, b).astype(np.float32),
        "rejected_lengths": rng.integers(1, 40, b).astype(np.float32),
    }
    full = {}
    for key, value in raw.items():
        filler = 1.0 if key.endswith("lengths") else 0.0
        full[key] = jnp.asarray(np.where(REAL, value, filler), jnp.float32)
    real = {key: value[REAL] for key, value in full.items()}
    return full, real


def _eps(loss_type):
    return {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)


def _paired_cases():
    """(name, fn(args) -> (losses, metrics), arg names) for every paired loss."""
    four = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    lengths = ("chosen_lengths", "rejected_lengths")
    cases = [(f"dpo_{t}", functools.partial(dpo_loss, loss_type=t, label_smoothing=_eps(t)),
              four + lengths) for t in LOSS_TYPES]
    cases.append(("dpo_mpo", functools.partial(dpo_loss, loss_type=("sigmoid", "bco_pair", "sft"),
                                               loss_weights=(0.8, 0.2, 1.0)), four + lengths))
    cases.append(("dpo_ipo_js", functools.partial(dpo_loss, loss_type="ipo",
                                                  f_divergence="js_divergence"), four + lengths))
    cases.append(("rdpo", functools.partial(rdpo_loss, alpha=0.02), four + lengths))
    cases += [(f"cpo_{t}_alphapo{a}", functools.partial(cpo_loss, loss_type=t, alphapo_alpha=a),
               ("chosen_logps", "rejected_logps") + lengths)
              for t in CPO_LOSS_TYPES for a in (0.0, 0.1)]
    cases.append(("simpo", simpo_loss, ("chosen_logps", "rejected_logps") + lengths))
    cases.append(("orpo", orpo_loss, ("chosen_logps", "rejected_logps") + lengths))
    return cases


PAIRED = _paired_cases()


def _call(fn, names, arrays, **kwargs):
    positional = [arrays[n] for n in names if not n.endswith("lengths")]
    keywords = {n: arrays[n] for n in names if n.endswith("lengths")}
    return fn(*positional, **keywords, **kwargs)


def _assert_metrics_equal(actual, expected, **tol):
    assert set(actual) == set(expected)
    for key in expected:
        chex.assert_shape(actual[key], ())
        chex.assert_type(actual[key], jnp.float32)
        np.testing.assert_allclose(actual[key], expected[key], err_msg=key, **tol)


class PairedMaskTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*PAIRED)
    def test_mask_equals_real_rows_only(self, fn, names):
        full, real = _batch(len(names))
        masked = self.variant(lambda arrays, mask: _call(fn, names, arrays, mask=mask))
        for mask in (jnp.asarray(REAL), jnp.asarray(REAL, jnp.float32)):  # bool or 0/1 float
            losses, metrics = masked(full, mask)
            expected_losses, expected_metrics = _call(fn, names, real)
            _assert_metrics_equal(metrics, expected_metrics, rtol=2e-6, atol=1e-6)
            chex.assert_shape(losses, (len(REAL),))
            if any(t in str(getattr(fn, "keywords", {}).get("loss_type")) for t in SORTING):
                np.testing.assert_allclose(losses[REAL].mean(), expected_losses.mean(),
                                           rtol=1e-6)
            else:
                np.testing.assert_allclose(losses[REAL], expected_losses, rtol=2e-6, atol=1e-6)

    @parameterized.named_parameters(*PAIRED)
    def test_mask_none_and_all_real_agree(self, fn, names):
        full, _ = _batch(len(names) + 1)
        losses, metrics = _call(fn, names, full)
        losses_all, metrics_all = _call(fn, names, full, mask=jnp.ones(len(REAL), bool))
        _assert_metrics_equal(metrics_all, metrics, rtol=1e-6, atol=1e-7)
        if not any(t in str(getattr(fn, "keywords", {}).get("loss_type")) for t in SORTING):
            np.testing.assert_allclose(losses_all, losses, rtol=1e-6, atol=1e-7)

    def test_metrics_unmasked_are_diluted(self):
        # The reason for mask=: without it the filler rows pull every mean towards 0.
        full, real = _batch(0)
        _, diluted = dpo_loss(**full)
        _, clean = dpo_loss(**real)
        assert not np.isclose(diluted["rewards/margins"], clean["rewards/margins"], rtol=1e-3)


@pytest.mark.parametrize("loss_type", ("sft", "aot", "aot_unpaired"))
def test_batch_level_terms_give_filler_no_gradient(loss_type):
    full, _ = _batch(3)
    mask = jnp.asarray(REAL)
    args = {k: v for k, v in full.items() if k not in ("chosen_logps", "rejected_logps")}

    def masked_mean(c, r):
        losses, _ = dpo_loss(c, r, **args, loss_type=loss_type, label_smoothing=_eps(loss_type),
                             mask=mask)
        return jnp.sum(jnp.where(mask, losses, 0.0)) / mask.sum()

    g_c, g_r = jax.grad(masked_mean, argnums=(0, 1))(full["chosen_logps"], full["rejected_logps"])
    np.testing.assert_array_equal(g_c[~REAL], 0.0)
    np.testing.assert_array_equal(g_r[~REAL], 0.0)
    assert np.all(g_c[REAL] != 0.0)


# ---------------------------------------------------------------- KTO and reward


def _kto_batch(seed):
    rng = np.random.default_rng(seed)
    b = len(REAL)
    ref = -rng.uniform(5, 60, b)
    ref_kl = -rng.uniform(5, 60, b)
    raw = {"logps": ref + rng.normal(0, 3, b), "ref_logps": ref,
           "kl_logps": ref_kl + rng.normal(0.5, 2, b), "ref_kl_logps": ref_kl}
    full = {k: jnp.asarray(np.where(REAL, v, 0.0), jnp.float32) for k, v in raw.items()}
    # As the KTO step builds it: a filler row is never desirable.
    desirable = (rng.uniform(size=b) < 0.5) & REAL
    real = {k: v[REAL] for k, v in full.items()}
    return full, jnp.asarray(desirable), real, jnp.asarray(desirable[REAL])


@pytest.mark.parametrize("loss_type", ("kto", "apo_zero_unpaired"))
@pytest.mark.parametrize("jit", (False, True))
def test_kto_mask_equals_real_rows_only(loss_type, jit):
    full, desirable, real, real_desirable = _kto_batch(5)
    kw = dict(loss_type=loss_type, desirable_weight=1.3)

    def run(arrays, desirable, **extra):
        kl = ({k: arrays[k] for k in ("kl_logps", "ref_kl_logps")} if loss_type == "kto" else {})
        return kto_loss(arrays["logps"], arrays["ref_logps"], desirable, **kl, **kw, **extra)

    masked = jax.jit(run) if jit else run
    losses, metrics = masked(full, desirable, mask=jnp.asarray(REAL, jnp.float32))
    expected_losses, expected = run(real, real_desirable)
    _assert_metrics_equal(metrics, expected, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(losses[REAL], expected_losses, rtol=2e-6, atol=1e-7)
    # Without the mask the filler rows count as undesirable and pull z0 to their zeros.
    _, unmasked = run(full, desirable)
    assert unmasked["count/rejected"] > expected["count/rejected"]


def test_kto_reference_point_mask_and_shape_error():
    full, desirable, real, _ = _kto_batch(6)
    np.testing.assert_allclose(
        kto_reference_point(full["kl_logps"], full["ref_kl_logps"], mask=jnp.asarray(REAL)),
        kto_reference_point(real["kl_logps"], real["ref_kl_logps"]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"mask's shape \(10,\).*kto_reference_point"):
        kto_loss(full["logps"], full["ref_logps"], desirable, kl_logps=full["kl_logps"][:4],
                 ref_kl_logps=full["ref_kl_logps"][:4], mask=jnp.asarray(REAL))


@pytest.mark.parametrize("jit", (False, True))
def test_reward_mask_equals_real_rows_only(jit):
    rng = np.random.default_rng(8)
    b = len(REAL)
    # Filler scores of 0 sit inside the real range here, so the min / max would not show
    # them; a filler of +-50 would: use those, as a padded row's score is arbitrary.
    r_c = jnp.asarray(np.where(REAL, rng.normal(0.5, 1, b), 50.0), jnp.float32)
    r_r = jnp.asarray(np.where(REAL, rng.normal(0, 1, b), -50.0), jnp.float32)
    margin = jnp.asarray(rng.uniform(0, 1, b), jnp.float32)
    fn = functools.partial(reward_loss, center_rewards_coefficient=0.01)
    masked = jax.jit(fn) if jit else fn
    losses, metrics = masked(r_c, r_r, margin=margin, mask=jnp.asarray(REAL))
    expected_losses, expected = fn(r_c[REAL], r_r[REAL], margin=margin[REAL])
    _assert_metrics_equal(metrics, expected, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(losses[REAL], expected_losses, rtol=1e-6)
    _, none_real = fn(r_c, r_r, mask=jnp.zeros(b, bool))
    assert all(float(v) == 0.0 for v in none_real.values())
