"""Gao et al.'s over-optimisation forms (jalign.gao): the fit recovers known coefficients,
R^2 is 1 - SS_res / SS_tot about the mean, and best-of-n's points come from blocks of n."""

import math

import numpy as np
import pytest

from jalign import gao
from jalign.overopt import best_of_n_points


@pytest.mark.parametrize("form,alpha,beta", [("bon", 0.30, 0.08), ("rl", 0.25, 0.10)])
def test_fit_recovers_known_coefficients_from_noisy_points(form, alpha, beta):
    rng = np.random.default_rng(0)
    d = np.concatenate([[0.0], np.linspace(0.2, 4.0, 40)])
    clean = gao.gao_curve(d, form, alpha, beta)
    noisy = clean + rng.normal(0, 0.01, d.shape)
    noisy[0] = 0.0  # the initial policy: gain 0 at d = 0
    fit = gao.fit_gao(d, noisy, form)
    assert fit.alpha == pytest.approx(alpha, abs=0.01)
    assert fit.beta == pytest.approx(beta, abs=0.01)
    # R^2 as documented, from an independent formula.
    pred = fit.alpha * d - fit.beta * (d * d if form == "bon" else
                                       np.array([x * math.log(x) if x > 0 else 0.0 for x in d]))
    r2 = 1 - np.sum((noisy - pred) ** 2) / np.sum((noisy - noisy.mean()) ** 2)
    assert fit.r2 == pytest.approx(r2, rel=1e-9)
    assert 0.9 < fit.r2 < 1.0
    # The peak of the fitted curve is where its derivative vanishes.
    peak = fit.peak_d()
    assert fit.predict([peak])[0] > fit.predict([0.95 * peak, 1.05 * peak]).max()


def test_exact_points_fit_exactly_and_a_wrong_form_fits_worse():
    d = np.linspace(0, 3, 13)
    bon = gao.gao_curve(d, "bon", 0.5, 0.2)
    exact = gao.fit_gao(d, bon, "bon")
    assert (exact.alpha, exact.beta) == pytest.approx((0.5, 0.2), abs=1e-9)
    assert exact.r2 == pytest.approx(1.0)
    assert gao.fit_gao(d, bon, "rl").r2 < 0.999
    assert exact.as_dict()["peak_kl"] == pytest.approx((0.5 / 0.4) ** 2)


def test_r_squared_is_negative_for_a_fit_worse_than_the_mean():
    assert gao.r_squared([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(1 - 8 / 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="form"):
        gao.fit_gao([0, 1, 2], [0, 1, 2], "ppo")
    with pytest.raises(ValueError, match="two points"):
        gao.fit_gao([0, 1], [0, 1], "rl")
    with pytest.raises(ValueError, match=">= 0"):
        gao.fit_gao([0, -1, 2], [0, 1, 2], "bon")
    assert gao.sqrt_kl([-0.1, 4.0]).tolist() == [0.0, 2.0]


def test_best_of_n_points_keep_the_proxys_best_of_each_block():
    # 2 prompts x 4 samples; the proxy prefers the last sample of each pair.
    gold = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    proxy = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.9, 0.7, 0.8]])
    rows = {r["n"]: r for r in best_of_n_points(gold, proxy, [1, 2, 4])}
    assert rows[1]["gold"] == pytest.approx(gold.mean())
    assert rows[2]["gold"] == pytest.approx(np.mean([(1 + 3) / 2, (5 + 7) / 2]))
    assert rows[4]["gold"] == pytest.approx(np.mean([3.0, 5.0]))
    assert rows[4]["proxy"] == pytest.approx(np.mean([0.4, 0.9]))
    assert rows[4]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    assert rows[1]["kl"] == 0.0
