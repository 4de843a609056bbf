"""Distillation step (GKD): the student learns the teacher's per-token distributions.

A *divergence function* plays the role the log-prob function plays for the other
steps, so the step works with any pair of models:

    divergence_fn(params, teacher_params, batch, rng=None) -> divergence_BxT  float32 [B, T-1]

Position t scores the distributions over token t+1 given tokens <= t (masked by
`batch["loss_mask"][:, 1:]`). `decoder_divergence_fn` is jalign's, for a student and
a teacher decoder of any sizes sharing a vocabulary: both models' final hidden
states go through the fused `jalign.ops.token_divergence`, so neither model's
[tokens, vocab] logits are built.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jalign.losses.distill import gkd_loss
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, unembedding
from jalign.ops import token_divergence
from jalign.state import TrainState, model_params
from jalign.steps.common import completion_mask, gradient_update


def _hidden_BxTxH(params, config: ModelConfig, batch, rngs=None):
    return Decoder(config).apply({"params": params}, batch["tokens"], batch.get("positions"),
                                 batch.get("segment_ids"), rngs=rngs or {})


def decoder_divergence_fn(student_cfg: ModelConfig, teacher_cfg: ModelConfig, *, beta: float,
                          temperature: float = 1.0, impl: str = "auto") -> Callable:
    """jalign's decoders as a divergence function (see the module docstring).

    The teacher's forward runs under `stop_gradient` (it is frozen). When the two
    unembeddings differ in width (vocabularies padded to different multiples), the
    divergence runs over the shared first min(V_s, V_t) ids; the tokenizer's ids all
    lie there (checked at set-up).
    """
    def fn(params, teacher_params, batch, rng=None):
        rngs = {"dropout": rng} if rng is not None and student_cfg.lora_dropout else None
        student_BxTxH = _hidden_BxTxH(params, student_cfg, batch, rngs)[:, :-1]
        teacher_BxTxH = jax.lax.stop_gradient(
            _hidden_BxTxH(teacher_params, teacher_cfg, batch)[:, :-1])
        w_student = unembedding(params, student_cfg)
        w_teacher = jax.lax.stop_gradient(unembedding(teacher_params, teacher_cfg))
        vocab = min(w_student.shape[1], w_teacher.shape[1])
        b, t = student_BxTxH.shape[:2]
        divergence_N = token_divergence(
            student_BxTxH.reshape(b * t, -1), w_student[:, :vocab],
            teacher_BxTxH.reshape(b * t, -1), w_teacher[:, :vocab], beta=beta,
            temperature=temperature, impl=impl,
            student_softcap=student_cfg.final_logit_softcap,
            teacher_softcap=teacher_cfg.final_logit_softcap)
        return divergence_N.reshape(b, t)
    return fn


def make_distill_step(divergence_fn: Callable, optimizer: optax.GradientTransformation, *,
                      teacher: Callable = lambda frozen: frozen["teacher"],
                      grad_accum_steps: int = 1) -> Callable:
    """Returns a pure `step(state, batch) -> (state, metrics)` for GKD.

    Args:
        divergence_fn: `(params, teacher_params, batch, rng=None) -> [B, T-1]` per-token
            generalised JSD (see the module docstring), e.g. `decoder_divergence_fn`.
        optimizer: an optax transformation over `state.params` (the student).
        teacher: `state.frozen -> teacher params` (default `frozen["teacher"]`, where
            `AlgorithmSetup.frozen_subtrees=("teacher",)` puts it).
        grad_accum_steps: microbatches per step (the result equals the whole batch's).

    The batch is an SFT batch (int32 [B, T] `tokens`, `loss_mask` 1 on completion
    tokens, `segment_ids`, `positions`) whose completions are the dataset's or the
    student's own samples (on-policy; the algorithm decides which, outside the
    step). The loss is `jalign.losses.gkd_loss`: the mean of the divergence over every
    completion token in the batch (TRL's GKD).

    Metrics: loss (TRL's GKD logs only the loss), grad_norm.
    """
    def sum_loss(params, teacher_params, batch, rng):
        divergence_BxT = divergence_fn(params, teacher_params, batch, rng)
        loss_sums_B, _ = gkd_loss(divergence_BxT, completion_mask(batch))
        return loss_sums_B.sum(), {}

    def step(state: TrainState, batch):
        rng = state.step_rng()
        teacher_params = teacher(state.frozen)
        state, metrics = gradient_update(
            optimizer, state,
            lambda p, b: sum_loss(model_params(p, state.frozen), teacher_params, b, rng), batch,
            count_fn=lambda b: completion_mask(b).sum(), num_microbatches=grad_accum_steps)
        return state.replace(step=state.step + 1), metrics

    return step
