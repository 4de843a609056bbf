"""Reward modeling, DPO family and KTO: preference data, reference handling, evaluation."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from jalign import losses
from jalign.algorithms.common import (AlgorithmSetup, check_vocab, load_start_params,
                                      load_tokenizer, report_skips, summarize_run,
                                      task_evaluator)
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn, sequence_scores
from jalign.steps.preference import (make_dpo_step, make_kto_step, make_reward_step,
                                     reference_logps_fn, sequence_logps)

REFERENCE_FREE = ("simpo", "cpo", "orpo")
PAIR_LOSSES = tuple(losses.LOSS_TYPES) + REFERENCE_FREE + ("rdpo",)


def pair_loss_fn(dpo_cfg):
    """(loss_fn, reference_free) for config.dpo; loss_fn has make_dpo_step's signature."""
    loss_type = dpo_cfg.loss_type
    types = [t.strip() for t in loss_type.split(",")] if isinstance(loss_type, str) else list(loss_type)
    for t in types:
        if t not in PAIR_LOSSES:
            raise ValueError(f"config.dpo.loss_type {t!r} is not known; valid: {list(PAIR_LOSSES)}")
    first = types[0]
    if first in REFERENCE_FREE or first == "rdpo":
        if len(types) > 1:
            raise ValueError(f"config.dpo.loss_type {first!r} cannot be mixed with other types")
        if first == "simpo":
            fn = functools.partial(losses.simpo_loss, beta=dpo_cfg.beta, gamma=dpo_cfg.simpo_gamma,
                                   label_smoothing=dpo_cfg.label_smoothing)
        elif first == "cpo":
            fn = functools.partial(losses.cpo_loss, beta=dpo_cfg.beta, cpo_alpha=dpo_cfg.cpo_alpha,
                                   label_smoothing=dpo_cfg.label_smoothing)
        elif first == "orpo":
            fn = functools.partial(losses.orpo_loss, beta=dpo_cfg.beta)
        else:
            rdpo = functools.partial(losses.rdpo_loss, beta=dpo_cfg.beta, alpha=dpo_cfg.rdpo_alpha)
            return rdpo, False

        def reference_free(c, r, ref_c, ref_r, **lengths):
            del ref_c, ref_r
            return fn(c, r, **lengths)
        return reference_free, True
    weights = dpo_cfg.loss_weights
    fn = functools.partial(
        losses.dpo_loss, loss_type=types[0] if len(types) == 1 else tuple(types),
        loss_weights=tuple(weights) if weights else None, beta=dpo_cfg.beta,
        label_smoothing=dpo_cfg.label_smoothing, f_divergence=dpo_cfg.f_divergence,
        f_alpha=dpo_cfg.f_alpha)
    return fn, False


def _records(config, tokenizer, *, paired: bool, split: str, n: int, label_noise: float):
    """(task, records, skip report): preference records from a built-in task or files.

    Built-in task pairs are labelled by the gold reward. Records that do not
    tokenise with the configured lengths (a prompt that fills max_length, a chat
    template that raises on the row) are raised or, under `on_bad_row="skip"`,
    counted in the same report as the file's bad rows, once, and printed.
    """
    from jalign.data import (SkipReport, load_preference_records,
                             preference_records_from_dicts, tokenizable_preference_records)
    data = config.data
    task, report = None, SkipReport()
    if data.source == "task":
        from jalign.tasks import get_task
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
            return None, [], report
        records, report = load_preference_records(paths, paired=paired,
                                                  on_bad_row=data.on_bad_row)
    records = tokenizable_preference_records(
        records, tokenizer, paired=paired, max_length=data.max_length,
        max_prompt_length=data.max_prompt_length, truncation=data.truncation,
        on_bad_row=data.on_bad_row, skip_report=report)
    report_skips(report, "training data" if split == "train" else "held-out data")
    return task, records, report


def _dataset_fn(config, tokenizer, records, *, paired: bool, shuffle=True, num_epochs=None):
    from jalign.data import make_preference_dataset, make_unpaired_dataset
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
                    # Several processes must agree on the padded width: one bucket then.
                    bucket_boundaries=(data.max_length,) if process_count > 1 else None, **kwargs)
    return dataset


def _eval_batches(config, tokenizer, records, *, paired=True):
    if not records:
        return []
    return list(_dataset_fn(config, tokenizer, records, paired=paired, shuffle=False,
                            num_epochs=1)(0, 1))


def _mean_over_pairs(values, masks):
    values, masks = np.concatenate(values), np.concatenate(masks)
    return float((values * masks).sum() / max(masks.sum(), 1.0))


# --------------------------------------------------------------------- reward model

def reward_setup(config, model_cfg: ModelConfig, workdir: str) -> AlgorithmSetup:
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
    _, train, report = _records(config, tokenizer, paired=True, split="train",
                                n=config.data.num_train_examples,
                                label_noise=config.data.label_noise)
    _, held_out, _ = _records(config, tokenizer, paired=True, split="eval",
                              n=config.data.num_eval_pairs, label_noise=0.0)
    batches = _eval_batches(config, tokenizer, held_out)
    score = jax.jit(lambda p, b: sequence_scores(p, model_cfg, b, 2 * b["pair_mask"].shape[0]))

    def evaluate(params, start_params):
        del start_params
        correct, margins, masks = [], [], []
        for batch in batches:
            s = np.asarray(score(params, batch))
            correct.append((s[0::2] > s[1::2]).astype(np.float32))
            margins.append(s[0::2] - s[1::2])
            masks.append(batch["pair_mask"])
        return {"eval/accuracy": _mean_over_pairs(correct, masks),
                "eval/margin": _mean_over_pairs(margins, masks)}

    return AlgorithmSetup(tokenizer=tokenizer,
                          dataset=_dataset_fn(config, tokenizer, train, paired=True),
                          params_init_fn=scalar_model_init_fn(model_cfg),
                          load_params=load_start_params(config, into="decoder"),
                          evaluate=evaluate if batches else None,
                          summarize=summarize_run("reward", skip_report=report))


def reward_step(config, model_cfg, optimizer, schedule, setup):
    loss_fn = functools.partial(losses.reward_loss,
                                center_rewards_coefficient=config.reward.center_rewards_coefficient)
    return make_reward_step(model_cfg, optimizer, loss_fn=loss_fn, schedule=schedule,
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
        fn = jax.jit(reference_logps_fn(model_cfg, paired=paired,
                                        logprob_impl=config.train.logprob_impl))
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


def _dpo_like_setup(config, model_cfg: ModelConfig, workdir: str, *, paired: bool) -> AlgorithmSetup:
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
    task, train, report = _records(config, tokenizer, paired=paired, split="train",
                                   n=config.data.num_train_examples,
                                   label_noise=config.data.label_noise)
    _, held_out, _ = _records(config, tokenizer, paired=True, split="eval",
                              n=config.data.num_eval_pairs, label_noise=0.0)
    reference_free = paired and pair_loss_fn(config.dpo)[1]
    precomputed = config.dpo.reference == "precomputed" and not reference_free
    batches = _eval_batches(config, tokenizer, held_out)
    logps_fn = jax.jit(lambda p, b: sequence_logps(p, model_cfg, b, 2 * b["pair_mask"].shape[0],
                                                   logprob_impl=config.train.logprob_impl)[0])
    generation_eval = task_evaluator(config, model_cfg, tokenizer, task)
    beta = config.dpo.beta

    def evaluate(params, start_params):
        out = generation_eval(params, start_params) if generation_eval else {}
        if batches and start_params is not None:
            correct, margins, masks = [], [], []
            for batch in batches:
                r = beta * (np.asarray(logps_fn(params, batch)) - np.asarray(logps_fn(start_params, batch)))
                correct.append((r[0::2] > r[1::2]).astype(np.float32))
                margins.append(r[0::2] - r[1::2])
                masks.append(batch["pair_mask"])
            out["eval/rewards/accuracies"] = _mean_over_pairs(correct, masks)
            out["eval/rewards/margins"] = _mean_over_pairs(margins, masks)
        return out

    def prepare(start_params):
        if precomputed:
            _precompute_reference(config, model_cfg, tokenizer, train, start_params, workdir,
                                  paired=paired)

    return AlgorithmSetup(tokenizer=tokenizer,
                          dataset=_dataset_fn(config, tokenizer, train, paired=paired),
                          load_params=load_start_params(config),
                          with_reference=not (precomputed or reference_free),
                          evaluate=evaluate, prepare=prepare,
                          summarize=summarize_run(config.algo, skip_report=report))


def dpo_setup(config, model_cfg, workdir):
    return _dpo_like_setup(config, model_cfg, workdir, paired=True)


def dpo_step(config, model_cfg, optimizer, schedule, setup):
    loss_fn, reference_free = pair_loss_fn(config.dpo)
    reference = "none" if reference_free else config.dpo.reference
    return make_dpo_step(model_cfg, optimizer, loss_fn=loss_fn, reference=reference,
                         ref_sync_every=config.dpo.ref_sync_every,
                         ref_sync_mixup=config.dpo.ref_sync_mixup, schedule=schedule,
                         logprob_impl=config.train.logprob_impl,
                         grad_accum_steps=_pair_accumulation(config))


def _pair_accumulation(config) -> int:
    steps = int(config.optimizer.grad_accum_steps)
    batch_coupled = {"aot", "aot_unpaired", "sft"} & set(config.dpo.loss_type.split(","))
    if steps > 1 and batch_coupled:
        raise ValueError(f"config.optimizer.grad_accum_steps={steps} with config.dpo.loss_type "
                         f"{sorted(batch_coupled)}: these losses compare or normalise across the "
                         "whole batch, so microbatches would change them; use 1")
    return steps


def kto_setup(config, model_cfg, workdir):
    return _dpo_like_setup(config, model_cfg, workdir, paired=False)


def kto_step(config, model_cfg, optimizer, schedule, setup):
    loss_fn = functools.partial(losses.kto_loss, beta=config.dpo.beta,
                                desirable_weight=config.dpo.desirable_weight,
                                undesirable_weight=config.dpo.undesirable_weight)
    if config.optimizer.grad_accum_steps > 1:
        raise ValueError("config.optimizer.grad_accum_steps > 1 is not supported for KTO: its "
                         "reference point z0 is estimated over the whole batch")
    return make_kto_step(model_cfg, optimizer, loss_fn=loss_fn, reference=config.dpo.reference,
                         schedule=schedule, logprob_impl=config.train.logprob_impl)
