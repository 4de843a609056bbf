"""Optimizers from config, built with optax."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine / linear decay or constant."""
    lr = float(cfg["learning_rate"])
    warmup = int(cfg.get("warmup_steps", 0))
    kind = cfg.get("schedule", "cosine")
    end = lr * float(cfg.get("end_learning_rate_factor", 0.0))
    decay_steps = max(total_steps - warmup, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norms and other vectors are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int, *,
                   updates_per_step: int = 1) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping, from `config.optimizer`.

    Keys: learning_rate, warmup_steps, schedule, end_learning_rate_factor, b1, b2,
    eps, weight_decay, max_grad_norm (0 disables clipping), mu_dtype (the first
    moment's dtype, e.g. "bfloat16" to halve it; "" keeps the params' dtype).
    """
    mu_dtype = cfg.get("mu_dtype", "") or None
    if mu_dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"config.optimizer.mu_dtype must be '', 'float32' or 'bfloat16', "
                         f"got {mu_dtype!r}")
    schedule = make_schedule(cfg, total_steps)
    # The returned schedule is in train steps; optax counts updates, and an RL step
    # takes `updates_per_step` of them (epochs x minibatches).
    by_update = schedule if updates_per_step == 1 else (
        lambda count: schedule(count // updates_per_step))
    parts = []
    max_norm = float(cfg.get("max_grad_norm", 1.0))
    if max_norm > 0:
        parts.append(optax.clip_by_global_norm(max_norm))
    parts.append(optax.adamw(by_update, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                             eps=float(cfg.get("eps", 1e-8)),
                             weight_decay=float(cfg.get("weight_decay", 0.0)), mask=decay_mask,
                             mu_dtype=mu_dtype))
    return optax.chain(*parts), schedule
