"""The data knobs are real: a reward model trained on noisier labels ranks held-out pairs worse."""

import functools

import jax
import numpy as np
import optax

from jalign.steps import decoder_score_fn
from jalign import losses
from jalign import sharding as shd
from jalign.data import make_preference_dataset, preference_records_from_dicts
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn, sequence_scores
from jalign.steps.preference import make_reward_step
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer
from jalign.state import init_train_state

CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128)


def _dataset(split, label_noise, *, num_epochs=None, seed=0):
    rows = get_task("sort").preference_pairs(1024 if split == "train" else 256, seed=seed + 1,
                                             label_noise=label_noise, split=split)
    records = preference_records_from_dicts(rows)[0]
    return make_preference_dataset(records, builtin_tokenizer(), batch_size=32, max_length=40,
                                   seed=seed, num_epochs=num_epochs, shuffle=split == "train")


def _held_out_accuracy(label_noise, evals=(150, 200, 250), seed=0):
    """Held-out pairwise accuracy averaged over several points of one run: a single
    point swings by +-0.1 with float rounding (reduction order), the average much less."""
    opt = optax.adam(1e-3)
    mesh = shd.make_mesh({"fsdp": 1}, jax.devices()[:1])
    state, _ = init_train_state(scalar_model_init_fn(CFG), opt, mesh, shd.DEFAULT_RULES, seed=seed)
    step = jax.jit(make_reward_step(decoder_score_fn(CFG), opt, loss_fn=functools.partial(
        losses.reward_loss, center_rewards_coefficient=0.01)))
    score = jax.jit(lambda p, b: sequence_scores(p, CFG, b, 2 * b["pair_mask"].shape[0]))
    eval_batches = list(_dataset("eval", 0.0, num_epochs=1, seed=seed))
    it = iter(_dataset("train", label_noise, seed=seed))
    accuracies = []
    for done in range(1, max(evals) + 1):
        state, _ = step(state, next(it))
        if done in evals:
            correct = total = 0.0
            for batch in eval_batches:
                s = np.asarray(score(state.params, batch))
                correct += float(((s[0::2] > s[1::2]) * batch["pair_mask"]).sum())
                total += float(batch["pair_mask"].sum())
            accuracies.append(correct / total)
    return float(np.mean(accuracies))


# Measured over seeds 0-5 (init, pairs and data order; 2-core AMD EPYC, no AVX-512):
# clean 0.772 0.799 0.730 0.669 0.837 0.803 (mean 0.769, sd 0.060); label noise 0.45:
# 0.533 0.508 0.496 0.618 0.513 0.505 (mean 0.529, sd 0.046). The bounds are the means
# -/+ 3 sd, rounded outwards: a single seed's 0.1 gap (the old margin) failed on seed 3.
CLEAN_ABOVE = 0.58     # 0.769 - 3 * 0.060
NOISY_BELOW = 0.67     # 0.529 + 3 * 0.046


def test_reward_accuracy_is_high_and_drops_with_label_noise():
    clean = _held_out_accuracy(0.0)
    noisy = _held_out_accuracy(0.45)
    assert clean > CLEAN_ABOVE, clean      # the model learns the gold ranking...
    assert noisy < NOISY_BELOW, noisy      # ...and 45% flipped labels leave it near chance
    assert noisy < clean, (clean, noisy)
