"""Bradley-Terry reward-model loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.losses._common import batch_mean, f32, real_rows


def reward_loss(chosen_rewards, rejected_rewards, *, margin=None,
                center_rewards_coefficient: float = 0.0, mask=None):
    """Pairwise Bradley-Terry loss of a scalar reward model (TRL's RewardTrainer).

    Bradley & Terry 1952; Ouyang et al. 2022, "Training language models to follow
    instructions with human feedback" (arXiv:2203.02155); the margin is Llama 2's
    (Touvron et al. 2023, arXiv:2307.09288); the centring term is Eisenstein et al. 2023,
    "Helping or Herding?" (arXiv:2312.09244):

        loss = -log sigmoid(r_c - r_r - m) + c (r_c + r_r)^2

    Args:
        chosen_rewards, rejected_rewards: scalar scores [B] (the head output at the last
            non-pad token).
        margin: optional per-pair margin m [B] (0 when None).
        center_rewards_coefficient: c; TRL's example value is 0.01.
        mask: optional [B] bool or 0/1 float, true for the real pairs of a padded batch
            (None: all real). Every metric (min and max included) is taken over the real
            pairs only (0 when there are none); losses are returned for every row (the
            caller masks them).

    Returns:
        (losses_B, metrics): per-pair losses (batch loss = their mean; equals TRL's
        mean(-ls(.)) + c mean((r_c + r_r)^2)) and float32 scalars with TRL's names:
        "accuracy" (mean of r_c > r_r), "margin" (mean r_c - r_r), "min_reward",
        "mean_reward", "max_reward" (over chosen and rejected together), plus
        "rewards/chosen" and "rewards/rejected" (means).
    """
    r_c, r_r = f32(chosen_rewards), f32(rejected_rewards)
    logits_B = r_c - r_r
    if margin is not None:
        logits_B = logits_B - f32(margin)
    losses_B = -jax.nn.log_sigmoid(logits_B)
    if center_rewards_coefficient:
        losses_B = losses_B + center_rewards_coefficient * (r_c + r_r) ** 2
    all_rewards = jax.lax.stop_gradient(jnp.concatenate([r_c.ravel(), r_r.ravel()]))
    if mask is None:
        all_mask, lowest, highest = None, jnp.min(all_rewards), jnp.max(all_rewards)
    else:
        real = real_rows(mask, r_c.shape).ravel()
        all_mask = jnp.concatenate([real, real])
        any_real = jnp.any(all_mask)
        lowest = jnp.where(any_real, jnp.min(jnp.where(all_mask, all_rewards, jnp.inf)), 0.0)
        highest = jnp.where(any_real, jnp.max(jnp.where(all_mask, all_rewards, -jnp.inf)), 0.0)
    metrics = {
        "accuracy": batch_mean((r_c > r_r).astype(jnp.float32), mask),
        "margin": batch_mean(r_c - r_r, mask),
        "min_reward": lowest,
        "mean_reward": batch_mean(all_rewards, all_mask),
        "max_reward": highest,
        "rewards/chosen": batch_mean(r_c, mask),
        "rewards/rejected": batch_mean(r_r, mask),
    }
    return losses_B, metrics
