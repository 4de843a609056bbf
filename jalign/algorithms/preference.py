"""Reward modeling, DPO family and KTO: preference data, reference handling, evaluation."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import numpy as np

from jalign import losses
from jalign.algorithms.common import (AlgorithmSetup, check_vocab, load_start_params,
                                      load_tokenizer, report_skips, report_truncation,
                                      summarize_run, task_evaluator)
from jalign.data import (SkipReport, TruncationReport, load_preference_records,
                         make_preference_dataset, make_unpaired_dataset,
                         preference_records_from_dicts, tokenizable_preference_records)
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn
from jalign.steps.common import decoder_logprob_fn
from jalign.steps.preference import (decoder_score_fn, make_dpo_step, make_kto_step,
                                     make_reward_step, reference_logps_fn, sequence_logp_sums)
from jalign.tasks import get_task

REFERENCE_FREE = ("simpo", "cpo", "orpo")
PAIR_LOSSES = tuple(losses.LOSS_TYPES) + REFERENCE_FREE + ("rdpo",)
# Loss types that compare or normalise across the whole batch (no microbatching).
BATCH_COUPLED = ("aot", "aot_unpaired", "sft")


@dataclasses.dataclass(frozen=True)
class PreferenceSpec:
    """`config.dpo` (with the optimizer's accumulation), read once.

    Shared by the DPO/KTO setup and step, online DPO and the fit check.
    `loss_fn` has `make_dpo_step`'s (or, for KTO, `make_kto_step`'s) signature;
    `reference` is "params", "precomputed" or "none" (reference-free losses).
    """
    loss_types: tuple[str, ...]
    loss_fn: Callable
    reference: str
    beta: float
    ref_sync_every: int = 0
    ref_sync_mixup: float = 1.0
    grad_accum_steps: int = 1
    nll_over_prompt: bool = False


def _pair_loss_fn(dpo, types: tuple[str, ...]) -> tuple[Callable, bool]:
    """(loss_fn, reference_free) for the loss types of config.dpo."""
    first = types[0]
    if first in REFERENCE_FREE or first == "rdpo":
        if len(types) > 1:
            raise ValueError(f"config.dpo.loss_type {first!r} cannot be mixed with other types")
        if first == "rdpo":
            return functools.partial(losses.rdpo_loss, beta=dpo.beta, alpha=dpo.rdpo_alpha), False
        if first == "simpo":
            fn = functools.partial(losses.simpo_loss, beta=dpo.beta, gamma=dpo.simpo_gamma,
                                   label_smoothing=dpo.label_smoothing)
        elif first == "cpo":
            fn = functools.partial(losses.cpo_loss, beta=dpo.beta, cpo_alpha=dpo.cpo_alpha,
                                   label_smoothing=dpo.label_smoothing)
        else:
            fn = functools.partial(losses.orpo_loss, beta=dpo.beta)

        def reference_free(c, r, ref_c, ref_r, **kwargs):
            del ref_c, ref_r
            return fn(c, r, **kwargs)
        return reference_free, True
    weights = dpo.loss_weights
    return functools.partial(
        losses.dpo_loss, loss_type=first if len(types) == 1 else types,
        loss_weights=tuple(weights) if weights else None, beta=dpo.beta,
        label_smoothing=dpo.label_smoothing, f_divergence=dpo.f_divergence,
        f_alpha=dpo.f_alpha), False


def pair_spec(config, *, online: bool = False) -> PreferenceSpec:
    """config.dpo for paired losses (DPO family; `online`: online DPO, whose reference
    is always the start policy's params and which takes no microbatches)."""
    dpo = config.dpo
    types = tuple(t.strip() for t in str(dpo.loss_type).split(",") if t.strip())
    for t in types or ("",):
        if t not in PAIR_LOSSES:
            raise ValueError(f"config.dpo.loss_type {t!r} is not known; valid: {list(PAIR_LOSSES)}")
    loss_fn, reference_free = _pair_loss_fn(dpo, types)
    reference = "none" if reference_free else ("params" if online else dpo.reference)
    accum = 1 if online else int(config.optimizer.grad_accum_steps)
    coupled = sorted(set(BATCH_COUPLED) & set(types))
    if accum > 1 and coupled:
        raise ValueError(f"config.optimizer.grad_accum_steps={accum} with config.dpo.loss_type "
                         f"{coupled}: these losses compare or normalise across the whole batch, "
                         "so microbatches would change them; use 1")
    sync = 0 if online else int(dpo.ref_sync_every)
    if sync and reference != "params":
        raise ValueError("TR-DPO reference syncing (config.dpo.ref_sync_every > 0) needs "
                         "config.dpo.reference='params' and a loss that uses a reference")
    if sync and config.model.lora_rank:
        raise ValueError("TR-DPO reference syncing (config.dpo.ref_sync_every > 0) does not apply "
                         "to LoRA runs, whose reference is the base model (model.lora_rank > 0)")
    nll_over_prompt = dpo.nll_tokens == "prompt_and_completion"
    if nll_over_prompt and not {"orpo", "cpo", "sft"} & set(types):
        raise ValueError("config.dpo.nll_tokens='prompt_and_completion' applies to the NLL "
                         f"term of orpo, cpo or an 'sft' mix; config.dpo.loss_type is {types}")
    return PreferenceSpec(loss_types=types, loss_fn=loss_fn, reference=reference,
                          beta=float(dpo.beta), ref_sync_every=sync,
                          ref_sync_mixup=float(dpo.ref_sync_mixup), grad_accum_steps=accum,
                          nll_over_prompt=nll_over_prompt)


def kto_spec(config) -> PreferenceSpec:
    dpo = config.dpo
    if config.optimizer.grad_accum_steps > 1:
        raise ValueError("config.optimizer.grad_accum_steps > 1 is not supported for KTO: its "
                         "reference point z0 is estimated over the whole batch")
    loss_fn = functools.partial(losses.kto_loss, beta=dpo.beta,
                                desirable_weight=dpo.desirable_weight,
                                undesirable_weight=dpo.undesirable_weight)
    return PreferenceSpec(loss_types=("kto",), loss_fn=loss_fn, reference=dpo.reference,
                          beta=float(dpo.beta))


def reward_spec(config):
    """The reward model's loss (config.reward)."""
    return functools.partial(losses.reward_loss,
                             center_rewards_coefficient=config.reward.center_rewards_coefficient)


def _records(config, tokenizer, *, paired: bool, split: str, n: int, label_noise: float):
    """(task, records, skip report, truncation report): preference records from a
    built-in task or files.

    Built-in task pairs are labelled by the gold reward. Records that do not
    tokenise with the configured lengths (a prompt that fills max_length, a chat
    template that raises on the row) are raised or, under `on_bad_row="skip"`,
    counted in the same report as the file's bad rows, once, and printed; what the
    lengths cut from the others is counted and printed.
    """
    data = config.data
    task, report, truncated = None, SkipReport(), TruncationReport()
    if data.source == "task":
        task = get_task(data.task)
        seed = config.seed + (0 if split == "train" else 7919)
        rows = (task.preference_pairs(n, seed=seed, label_noise=label_noise,
                                      length_bias=data.length_bias if split == "train" else 0.0,
                                      split=split) if paired else
                task.unpaired(n, seed=seed, label_noise=label_noise, split=split))
        records = preference_records_from_dicts(rows, paired=paired, name=f"{task.name}:{split}")[0]
    else:
        paths = [p for p in (data.path if split == "train" else data.eval_path).split(",") if p]
        if not paths:
            if split == "train":
                raise ValueError(f"config.data.path must name the {data.source} file(s) to read")
            return None, [], report, truncated
        records, report = load_preference_records(paths, paired=paired,
                                                  on_bad_row=data.on_bad_row)
    records = tokenizable_preference_records(
        records, tokenizer, paired=paired, max_length=data.max_length,
        max_prompt_length=data.max_prompt_length, truncation=data.truncation,
        on_bad_row=data.on_bad_row, skip_report=report, truncation_report=truncated)
    what = "training data" if split == "train" else "held-out data"
    report_skips(report, what)
    report_truncation(truncated, data, what)
    return task, records, report, truncated


def _dataset_fn(config, tokenizer, records, *, paired: bool, shuffle=True, num_epochs=None):
    data = config.data
    make = make_preference_dataset if paired else make_unpaired_dataset

    def dataset(process_index, process_count):
        if data.batch_size % process_count:
            raise ValueError(f"config.data.batch_size ({data.batch_size}) must be divisible by "
                             f"the number of processes ({process_count})")
        kwargs = dict(packing=data.packing) if paired else {}
        return make(records, tokenizer, batch_size=data.batch_size // process_count,
                    max_length=data.max_length, seed=config.seed, shuffle=shuffle,
                    num_epochs=num_epochs, max_prompt_length=data.max_prompt_length,
                    truncation=data.truncation, shard_index=process_index,
                    shard_count=process_count, on_bad_row=data.on_bad_row,
                    # Every process pads step k's batch to the same width (jalign.data.padding).
                    pad_to_multiple_of=data.pad_to_multiple_of,
                    bucket_boundaries=data.bucket_boundaries, **kwargs)
    return dataset


def _eval_batches(config, tokenizer, records, *, paired=True):
    if not records:
        return []
    return list(_dataset_fn(config, tokenizer, records, paired=paired, shuffle=False,
                            num_epochs=1)(0, 1))


def held_out_pair_metrics(batches, rewards_fn) -> tuple[float, float]:
    """(accuracy, mean margin) over the real pairs of `batches`, where
    `rewards_fn(batch) -> [2B]` gives each sequence's reward (2p chosen, 2p+1 rejected)."""
    correct = margins = count = 0.0
    for batch in batches:
        r = np.asarray(rewards_fn(batch))
        real = np.asarray(batch["pair_mask"]) > 0
        correct += float(((r[0::2] > r[1::2]) & real).sum())
        margins += float(np.where(real, r[0::2] - r[1::2], 0.0).sum())
        count += float(real.sum())
    count = max(count, 1.0)
    return correct / count, margins / count


# --------------------------------------------------------------------- reward model

def _preference_data(config, model_cfg: ModelConfig, *, paired: bool):
    """(tokenizer, task, training records, their skip and truncation reports, held-out
    pair batches)."""
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
    task, train, report, truncated = _records(config, tokenizer, paired=paired, split="train",
                                              n=config.data.num_train_examples,
                                              label_noise=config.data.label_noise)
    _, held_out, _, _ = _records(config, tokenizer, paired=True, split="eval",
                                 n=config.data.num_eval_pairs, label_noise=0.0)
    return (tokenizer, task, train, report, truncated,
            _eval_batches(config, tokenizer, held_out))


def reward_setup(config, model_cfg: ModelConfig, spec, workdir: str) -> AlgorithmSetup:
    del spec, workdir
    tokenizer, _, train, report, truncated, batches = _preference_data(config, model_cfg,
                                                                        paired=True)
    score = jax.jit(decoder_score_fn(model_cfg))

    def evaluate(params, start_params):
        del start_params
        accuracy, margin = held_out_pair_metrics(batches, lambda b: score(params, b))
        return {"eval_accuracy": accuracy, "eval_margin": margin}

    return AlgorithmSetup(dataset=_dataset_fn(config, tokenizer, train, paired=True),
                          params_init_fn=scalar_model_init_fn(model_cfg),
                          load_params=load_start_params(config, into="decoder"),
                          evaluate=evaluate if batches else None,
                          summarize=summarize_run("reward", skip_report=report,
                                                  truncation_report=truncated))


def reward_step(config, model_cfg, loss_fn, optimizer):
    return make_reward_step(decoder_score_fn(model_cfg), optimizer, loss_fn=loss_fn,
                            grad_accum_steps=config.optimizer.grad_accum_steps)


# --------------------------------------------------------------------- DPO family

def _precompute_reference(config, model_cfg, tokenizer, records, params, workdir, *, paired):
    """Reference log-probs for every record, computed once and stored next to the data.

    Saved to WORKDIR/reference_logps.npz so a resumed run reads them back instead
    of recomputing with (by then trained) params.
    """
    path = os.path.join(workdir, "reference_logps.npz")
    keys = ("ref_chosen_logps", "ref_rejected_logps") if paired else ("ref_logps", "ref_kl_logps")
    if os.path.exists(path):
        stored = dict(np.load(path))
    else:
        fn = jax.jit(reference_logps_fn(
            decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl), paired=paired))
        stored = {k: np.zeros(len(records), np.float32) for k in keys}
        for batch in _eval_batches(config, tokenizer, records, paired=paired):
            out = jax.device_get(fn(params, batch))
            real = batch["example_index"] >= 0
            for k in keys:
                stored[k][batch["example_index"][real]] = out[k][real]
        if jax.process_index() == 0:
            np.savez(path, **stored)
    for i, record in enumerate(records):
        for k in keys:
            record[k] = float(stored[k][record.get("_index", i)])


def _dpo_like_setup(config, model_cfg: ModelConfig, spec: PreferenceSpec, workdir: str, *,
                    paired: bool) -> AlgorithmSetup:
    tokenizer, task, train, report, truncated, batches = _preference_data(config, model_cfg,
                                                                           paired=paired)
    logprob_fn = decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl)
    logps_fn = jax.jit(lambda p, b: sequence_logp_sums(logprob_fn, p, b,
                                                       2 * b["pair_mask"].shape[0])[0])
    generation_eval = task_evaluator(config, model_cfg, tokenizer, task)
    beta = spec.beta

    def evaluate(params, start_params):
        out = generation_eval(params, start_params) if generation_eval else {}
        if batches and start_params is not None:
            accuracy, margin = held_out_pair_metrics(batches, lambda b: beta * (
                np.asarray(logps_fn(params, b)) - np.asarray(logps_fn(start_params, b))))
            out["eval_rewards/accuracies"], out["eval_rewards/margins"] = accuracy, margin
        return out

    def prepare(start_params):
        _precompute_reference(config, model_cfg, tokenizer, train, start_params, workdir,
                              paired=paired)

    return AlgorithmSetup(dataset=_dataset_fn(config, tokenizer, train, paired=paired),
                          load_params=load_start_params(config),
                          with_reference=spec.reference == "params",
                          evaluate=evaluate,
                          prepare=prepare if spec.reference == "precomputed" else None,
                          summarize=summarize_run(config.algo, skip_report=report,
                                                  truncation_report=truncated))


def dpo_setup(config, model_cfg, spec, workdir):
    return _dpo_like_setup(config, model_cfg, spec, workdir, paired=True)


def dpo_step(config, model_cfg, spec: PreferenceSpec, optimizer):
    # with_stats: TRL's entropy, mean_token_accuracy and logits/* metrics.
    return make_dpo_step(decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl,
                                            with_stats=True),
                         optimizer, loss_fn=spec.loss_fn, reference=spec.reference,
                         ref_sync_every=spec.ref_sync_every, ref_sync_mixup=spec.ref_sync_mixup,
                         grad_accum_steps=spec.grad_accum_steps,
                         nll_over_prompt=spec.nll_over_prompt)


def kto_setup(config, model_cfg, spec, workdir):
    return _dpo_like_setup(config, model_cfg, spec, workdir, paired=False)


def kto_step(config, model_cfg, spec: PreferenceSpec, optimizer):
    return make_kto_step(decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl),
                         optimizer, loss_fn=spec.loss_fn, reference=spec.reference)
