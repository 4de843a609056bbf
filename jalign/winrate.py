"""Win rate of a policy against a reference policy, raw and length-controlled (NumPy).

Each held-out prompt gives one comparison: the policy's completion against the
reference policy's, scored by a gold reward or a judge; a preference of 1 (win), 0
(loss) or 0.5 (tie). The raw win rate is their mean. A judge (or a labeller) that likes
long answers rewards a policy for growing longer; the length-controlled win rate asks
what the win rate would be at equal length: a logistic regression

    P(win | d) = sigmoid(b0 + b1 * d),   d = (len(policy) - len(reference)) / scale,

fitted by maximum likelihood on the (fractional, for ties) preferences, read at d = 0:
sigmoid(b0).

This is AlpacaEval-LC's idea (Dubois et al. 2024, arXiv:2404.04475) simplified: one
policy pair instead of a GLM shared across models, the length difference itself
(scaled by its standard deviation) instead of tanh of the standardised difference, no
instruction-difficulty term, and no regularisation beyond a tiny ridge that keeps a
separable fixture finite.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def preferences(policy_scores, reference_scores, *, tie_tol: float = 0.0) -> np.ndarray:
    """1 where the policy's score is higher, 0 where lower, 0.5 within `tie_tol`."""
    diff = np.asarray(policy_scores, np.float64) - np.asarray(reference_scores, np.float64)
    return np.where(np.abs(diff) <= tie_tol, 0.5, (diff > 0).astype(np.float64))


def fit_logistic(x_NxD, y_N, *, ridge: float = 1e-6, iters: int = 50) -> np.ndarray:
    """Weights w maximising sum_i y_i log s(x_i w) + (1 - y_i) log(1 - s(x_i w)) -
    ridge/2 |w|^2 (y in [0, 1], so ties count as half a win), by Newton's method."""
    x = np.asarray(x_NxD, np.float64)
    y = np.asarray(y_N, np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (y - p) - ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w = w + step
        if np.max(np.abs(step)) < 1e-12:
            break
    return w


def win_rates(prefs, policy_lengths: Sequence[float],
              reference_lengths: Sequence[float]) -> dict[str, float]:
    """winrate/raw, winrate/length_controlled (the fit's win rate at zero length
    difference), winrate/length_coef (b1 per standard deviation of the length
    difference) and winrate/mean_length_diff, from preferences in [0, 1]."""
    y = np.asarray(prefs, np.float64)
    diff = np.asarray(policy_lengths, np.float64) - np.asarray(reference_lengths, np.float64)
    scale = diff.std() or 1.0
    b0, b1 = fit_logistic(np.stack([np.ones_like(diff), diff / scale], 1), y)
    return {"winrate/raw": float(y.mean()),
            "winrate/length_controlled": float(1.0 / (1.0 + np.exp(-b0))),
            "winrate/length_coef": float(b1), "winrate/mean_length_diff": float(diff.mean())}
