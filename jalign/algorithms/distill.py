"""Distillation: generalised knowledge distillation (GKD) from a frozen teacher.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", arXiv:2306.13649) trains the student on the per-token
generalised JSD to the teacher (`jalign.losses.gkd_loss` over
`jalign.ops.token_divergence`). With probability `config.distill.lmbda` a step's
completions are the student's own samples (on-policy, from jalign's sampler at
`config.distill.temperature`); otherwise they are the SFT data's (a built-in task's
demonstrations or prompt/completion files). lmbda = 1, beta = 1 is on-policy
reverse-KL distillation.

The teacher (`config.distill.teacher`: a Hugging Face folder, a jalign WORKDIR or its
final_params) may differ from the student in every size but the vocabulary; it must
use the same tokenizer. It sits in the train state as `state.frozen["teacher"]`,
sharded by its own logical axes like the student, with no optimizer state, and is
saved with each checkpoint like DPO's reference.

Whether step k is on-policy is drawn from (config.seed, k) alone and the samples'
randomness from the train state, so a resumed run takes the same steps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jalign.algorithms.common import (AlgorithmSetup, check_vocab, load_start_params,
                                      load_tokenizer, summarize_run, task_evaluator)
from jalign.algorithms.rollout import batch_sharding, local_rows, make_sampler
from jalign.algorithms.sft import sft_dataset_fn, sft_records
from jalign.generate import left_pad
from jalign.models import pretrained
from jalign.models.config import ModelConfig
from jalign.models.transformer import decoder_init_fn
from jalign.ops.divergence import IMPLS
from jalign.steps.distill import decoder_divergence_fn, make_distill_step
from jalign.tokenizer import Tokenizer, builtin_tokenizer

TEACHER = "teacher"  # the teacher's entry in state.frozen
# The arrays a distillation step reads, on- and off-policy alike (one step signature).
BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")
# Folded with (seed, step) into the on/off-policy draw, apart from every other stream.
_SCHEDULE_STREAM = 0x6B64


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    teacher: str
    beta: float
    temperature: float
    lmbda: float
    max_new_tokens: int
    divergence_impl: str


def spec(config) -> DistillSpec:
    """`config.distill`, checked (the teacher's folder is read at set-up: in a pipeline it
    is written by an earlier stage)."""
    d = config.distill
    if not d.teacher:
        raise ValueError("config.distill.teacher is not set: give the teacher model, a Hugging "
                         "Face folder, a jalign WORKDIR or its final_params (in a pipeline, "
                         "'stage:NAME' for an earlier stage's WORKDIR)")
    if not 0.0 <= float(d.beta) <= 1.0:
        raise ValueError(f"config.distill.beta must be in [0, 1] (0: forward KL, 1: reverse KL), "
                         f"got {d.beta!r}")
    if not float(d.temperature) > 0.0:
        raise ValueError(f"config.distill.temperature must be > 0, got {d.temperature!r}")
    if not 0.0 <= float(d.lmbda) <= 1.0:
        raise ValueError(f"config.distill.lmbda (the fraction of on-policy steps) must be in "
                         f"[0, 1], got {d.lmbda!r}")
    if float(d.lmbda) > 0.0 and int(d.max_new_tokens) < 1:
        raise ValueError(f"config.distill.max_new_tokens must be >= 1 when lmbda > 0, "
                         f"got {d.max_new_tokens!r}")
    if d.divergence_impl not in IMPLS:
        raise ValueError(f"config.distill.divergence_impl={d.divergence_impl!r} is not valid; "
                         f"valid: {list(IMPLS)}")
    if float(d.lmbda) > 0.0 and config.data.packing:
        raise ValueError("config.data.packing=True with config.distill.lmbda > 0: on-policy "
                         "steps read one prompt per row; set config.data.packing=False")
    return DistillSpec(str(d.teacher), float(d.beta), float(d.temperature), float(d.lmbda),
                       int(d.max_new_tokens), str(d.divergence_impl))


def on_policy_at(seed: int, step: int, lmbda: float) -> bool:
    """Whether 0-based step `step` trains on the student's samples: a draw from (seed,
    step) only, so every process and every resumed run agree."""
    if lmbda <= 0.0:
        return False
    return bool(np.random.default_rng((seed, step, _SCHEDULE_STREAM)).random() < lmbda)


def find_teacher(spec: DistillSpec) -> tuple[pretrained.Pretrained, ModelConfig]:
    """The teacher's folder and architecture; errors name config.distill.teacher."""
    if not os.path.exists(spec.teacher):
        raise FileNotFoundError(f"config.distill.teacher={spec.teacher!r}: no such file or "
                                "directory")
    try:
        source = pretrained.find(spec.teacher)
    except (FileNotFoundError, ValueError) as e:
        message = str(e).replace(f"config.init_from={spec.teacher!r}", "")
        raise ValueError(
            f"config.distill.teacher={spec.teacher!r}: {message.strip(' :')}") from None
    if source.model is None:
        raise ValueError(f"config.distill.teacher={spec.teacher!r} states no architecture (no "
                         f"{pretrained.MODEL_CONFIG_FILE} beside it): give the run's WORKDIR or a "
                         "Hugging Face folder")
    return source, source.model


def teacher_tokenizer(source: pretrained.Pretrained) -> Tokenizer:
    """The teacher's tokenizer: its folder's, else the built-in one (a jalign run without
    a tokenizer file writes none)."""
    return Tokenizer.from_file(source.tokenizer) if source.tokenizer else builtin_tokenizer()


def check_same_tokenizer(student: Tokenizer, teacher: Tokenizer, teacher_path: str) -> None:
    """Raises naming both vocabularies (sizes and the first differing token) unless the
    student's and the teacher's tokenizers map the same tokens to the same ids."""
    ours = student.backend.get_vocab(with_added_tokens=True)
    theirs = teacher.backend.get_vocab(with_added_tokens=True)
    if ours == theirs and student.eos_id == teacher.eos_id:
        return
    by_id_ours = {i: t for t, i in ours.items()}
    by_id_theirs = {i: t for t, i in theirs.items()}
    differing = next((i for i in sorted(set(by_id_ours) | set(by_id_theirs))
                      if by_id_ours.get(i) != by_id_theirs.get(i)), None)
    detail = (f"id {differing} is {by_id_ours.get(differing)!r} for the student and "
              f"{by_id_theirs.get(differing)!r} for the teacher" if differing is not None else
              f"EOS is id {student.eos_id} for the student and {teacher.eos_id} for the teacher")
    raise ValueError(
        f"config.distill.teacher={teacher_path!r} uses another tokenizer: the student's "
        f"vocabulary has {len(ours)} tokens, the teacher's {len(theirs)}; {detail}. "
        "Distillation compares next-token distributions id by id, so both must share one "
        "tokenizer (config.data.tokenizer is the student's)")


def completion_prompts(host_batch) -> list[np.ndarray]:
    """Each row's prompt token ids (BOS included) in an SFT batch of one sequence per row:
    the real tokens before the first completion token."""
    tokens, loss_mask = np.asarray(host_batch["tokens"]), np.asarray(host_batch["loss_mask"])
    real = np.asarray(host_batch["segment_ids"]) > 0
    return [row[keep & (mask == 0)] for row, keep, mask in zip(tokens, real, loss_mask)]


def _agreed_width(prompts: list[np.ndarray], multiple: int = 16) -> int:
    """Every process pads its prompts to the same width (one global array)."""
    width = -(-max(len(p) for p in prompts) // multiple) * multiple
    if jax.process_count() == 1:
        return width
    return int(np.max(multihost_utils.process_allgather(np.asarray(width))))


def make_on_policy(config, model_cfg: ModelConfig, spec: DistillSpec, tokenizer) -> Callable:
    """The loop's rollout hook: `(state, host batch, *, step, next_batch) -> (batch,
    metrics)`, replacing the completions of on-policy steps with the student's samples."""
    sampler = make_sampler(model_cfg, tokenizer, max_new_tokens=spec.max_new_tokens,
                           temperature=spec.temperature)

    def rollout(state, host_batch, *, step: int, next_batch: Callable):
        del next_batch
        if not on_policy_at(config.seed, step, spec.lmbda):
            return {k: host_batch[k] for k in BATCH_KEYS}, {"distill/on_policy": 0.0}
        prompts = completion_prompts(host_batch)
        prompt, mask = left_pad(prompts, tokenizer.pad_id, _agreed_width(prompts))
        put = functools.partial(jax.make_array_from_process_local_data,
                                batch_sharding(config, state.params))
        batch, _, completion_mask = sampler(state.params, state.rng, state.step, 0,
                                            put(prompt), put(mask))
        lengths = local_rows(completion_mask).sum(-1)
        return ({k: batch[k] for k in BATCH_KEYS},
                {"distill/on_policy": 1.0, "completions/mean_length": float(lengths.mean())})
    return rollout


def setup(config, model_cfg: ModelConfig, spec: DistillSpec, workdir: str) -> AlgorithmSetup:
    del workdir
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
    source, teacher_cfg = find_teacher(spec)
    check_same_tokenizer(tokenizer, teacher_tokenizer(source), spec.teacher)
    if teacher_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config.distill.teacher={spec.teacher!r}: its vocab_size "
                         f"({teacher_cfg.vocab_size}) is smaller than the tokenizer's vocabulary "
                         f"({tokenizer.vocab_size})")
    task, records, report, truncated = sft_records(config, tokenizer)
    dataset = sft_dataset_fn(config, records, tokenizer)

    student_init, teacher_init = decoder_init_fn(model_cfg), decoder_init_fn(teacher_cfg)

    def params_init(rng):
        # The student's init is the SFT run's for the same seed.
        return {**student_init(rng), TEACHER: teacher_init(jax.random.fold_in(rng, 1))}

    load_student = load_start_params(config)

    def load(abstract):
        student = {k: v for k, v in abstract.items() if k != TEACHER}
        out = dict(load_student(student)) if load_student else {k: None for k in student}
        return {**out, TEACHER: source.load(abstract[TEACHER])}

    return AlgorithmSetup(dataset=dataset, params_init_fn=params_init, load_params=load,
                          frozen_subtrees=(TEACHER,),
                          evaluate=task_evaluator(config, model_cfg, tokenizer, task),
                          summarize=summarize_run("distill", skip_report=report,
                                                  truncation_report=truncated),
                          rollout=make_on_policy(config, model_cfg, spec, tokenizer))


def make_step(config, model_cfg: ModelConfig, spec: DistillSpec, optimizer):
    _, teacher_cfg = find_teacher(spec)
    divergence_fn = decoder_divergence_fn(model_cfg, teacher_cfg, beta=spec.beta,
                                          temperature=spec.temperature,
                                          impl=spec.divergence_impl)
    return make_distill_step(divergence_fn, optimizer,
                             teacher=lambda frozen: frozen[TEACHER],
                             grad_accum_steps=config.optimizer.grad_accum_steps)
