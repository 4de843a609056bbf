"""Length-controlled win rate (jalign.winrate) against independent fits."""

import numpy as np
import pytest

from jalign import winrate


def _logit(p):
    return np.log(p / (1 - p))


def test_two_length_groups_match_the_closed_form_fit():
    # With two length differences (+a, -a) the logistic model is saturated: the fit
    # reproduces each group's win rate, so b0 = (logit(m+) + logit(m-)) / 2 by hand.
    prefs = np.array([1, 1, 1, 0.5, 0, 1, 1, 1,     # longer: mean 6.5/8
                      0, 1, 0, 0, 0.5, 0, 1, 0])    # shorter: mean 2.5/8
    policy = np.array([30] * 8 + [10] * 8)
    reference = np.full(16, 20)
    out = winrate.win_rates(prefs, policy, reference)
    m_long, m_short = 6.5 / 8, 2.5 / 8
    b0 = 0.5 * (_logit(m_long) + _logit(m_short))
    assert out["winrate/raw"] == pytest.approx(9 / 16)
    assert out["winrate/length_controlled"] == pytest.approx(1 / (1 + np.exp(-b0)), abs=1e-6)
    # d is scaled by its std (10): b1 = (logit(m+) - logit(m-)) / 2 per std.
    assert out["winrate/length_coef"] == pytest.approx(0.5 * (_logit(m_long) - _logit(m_short)),
                                                       abs=1e-6)


def test_continuous_lengths_match_a_generic_optimiser():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    diff = rng.normal(5.0, 8.0, 200)
    prefs = (rng.random(200) < 1 / (1 + np.exp(-(0.2 + 0.15 * diff)))).astype(float)
    prefs[:10] = 0.5
    x = np.stack([np.ones(200), diff / diff.std()], 1)

    def nll(w):
        z = x @ w
        return -np.sum(prefs * z - np.logaddexp(0, z))

    w = optimize.minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    out = winrate.win_rates(prefs, diff + 20, np.full(200, 20.0))
    assert out["winrate/length_controlled"] == pytest.approx(1 / (1 + np.exp(-w[0])), abs=1e-5)
    assert out["winrate/length_coef"] == pytest.approx(w[1], abs=1e-4)
    # The policy is longer and length wins: length control lowers its win rate.
    assert out["winrate/length_controlled"] < out["winrate/raw"]


def test_preferences_count_ties_as_half():
    np.testing.assert_array_equal(winrate.preferences([1.0, 0.2, 0.5], [0.5, 0.5, 0.5]),
                                  [1.0, 0.0, 0.5])
