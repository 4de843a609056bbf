"""Gao et al.'s functional forms of reward-model over-optimisation, fitted by least squares.

With d = sqrt(KL(pi || pi_init)) and R(d) the gold reward's gain over the initial
policy's (R(0) = 0), Gao, Schulman & Hilton found

    best-of-n:  R_bon(d) = d (alpha - beta d)
    RL:         R_rl(d)  = d (alpha - beta log d)

Both are linear in (alpha, beta), so ordinary least squares on the features
[d, -d^2] (best-of-n) or [d, -d log d] (RL; d log d -> 0 as d -> 0) fits them
exactly, with no intercept: the curve passes through the origin by construction.
Pass the d = 0 point (the initial policy, gain 0) with the others; it enters the
residuals and R^2 like any point.

    R^2 = 1 - sum_i (y_i - yhat_i)^2 / sum_i (y_i - mean(y))^2

over every point passed (the d = 0 point included): the fraction of the gains'
variance about their mean that the fitted curve explains. It is not clipped, so
a curve worse than the constant mean reads negative.

Reference: Gao, Schulman, Hilton, "Scaling Laws for Reward Model Overoptimization",
arXiv:2210.10760 (section 3, equations 1 and 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

FORMS = ("bon", "rl")


def _features(d, form: str) -> np.ndarray:
    d = np.asarray(d, np.float64)
    if form == "bon":
        return np.stack([d, -d * d], -1)
    if form == "rl":
        d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
        return np.stack([d, -d_log_d], -1)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def gao_curve(d, form: str, alpha: float, beta: float) -> np.ndarray:
    """d (alpha - beta d) ("bon") or d (alpha - beta log d) ("rl") at d = sqrt(KL)."""
    return _features(d, form) @ np.array([alpha, beta], np.float64)


@dataclasses.dataclass(frozen=True)
class GaoFit:
    form: str          # "bon": d (alpha - beta d); "rl": d (alpha - beta log d)
    alpha: float
    beta: float
    r2: float          # see the module docstring
    num_points: int

    def predict(self, d) -> np.ndarray:
        """The fitted gain at d = sqrt(KL)."""
        return gao_curve(d, self.form, self.alpha, self.beta)

    def peak_d(self) -> float:
        """The d at which the fitted gain peaks (inf when beta <= 0: no peak):
        alpha / (2 beta) for best-of-n, exp(alpha / beta - 1) for RL."""
        if self.beta <= 0:
            return math.inf
        if self.form == "bon":
            return self.alpha / (2 * self.beta)
        return math.exp(min(self.alpha / self.beta - 1, 700.0))

    def as_dict(self) -> dict:
        peak = self.peak_d()
        return {**dataclasses.asdict(self), "peak_d": peak if math.isfinite(peak) else None,
                "peak_kl": peak * peak if math.isfinite(peak) else None}


def r_squared(y, y_hat) -> float:
    """1 - SS_res / SS_tot about the mean of y (NaN when every y is equal)."""
    y, y_hat = np.asarray(y, np.float64), np.asarray(y_hat, np.float64)
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - y_hat) ** 2).sum()) / total if total > 0 else float("nan")


def fit_gao(d: Sequence[float], gain: Sequence[float], form: str) -> GaoFit:
    """Least-squares alpha, beta of `form` ("bon" or "rl") through the points
    (d_i, gain_i), d = sqrt(KL) >= 0 and gain the gold (or proxy) reward minus the
    initial policy's; include the d = 0 point. Needs at least two points with d > 0."""
    d = np.asarray(d, np.float64)
    gain = np.asarray(gain, np.float64)
    if d.shape != gain.shape or d.ndim != 1:
        raise ValueError(f"d and gain must be 1-D of one length, got {d.shape} and {gain.shape}")
    if np.any(d < 0) or not np.all(np.isfinite(d)) or not np.all(np.isfinite(gain)):
        raise ValueError("d must be finite and >= 0 (d = sqrt(KL)), gain finite")
    if np.count_nonzero(d > 0) < 2:
        raise ValueError("a fit of two coefficients needs at least two points with d > 0")
    x = _features(d, form)
    (alpha, beta), *_ = np.linalg.lstsq(x, gain, rcond=None)
    return GaoFit(form, float(alpha), float(beta), r_squared(gain, x @ np.array([alpha, beta])),
                  int(d.size))


def sqrt_kl(kl) -> np.ndarray:
    """d = sqrt(KL), a sampled KL estimate below 0 (noise near the start) read as 0."""
    return np.sqrt(np.maximum(np.asarray(kl, np.float64), 0.0))
