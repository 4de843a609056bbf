"""Pieces every algorithm setup uses: the setup record, tokenizer, task evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from jalign import judges
from jalign import sharding as shd
from jalign.algorithms.episodes import episode_evaluator
from jalign.evaluate import evaluate_policy
from jalign.label import shown_prompt
from jalign.models import pretrained
from jalign.models.config import ModelConfig
from jalign.tasks import get_task
from jalign.tokenizer import Tokenizer, builtin_tokenizer


@dataclasses.dataclass
class AlgorithmSetup:
    dataset: Callable[[int, int], Any]          # (process_index, process_count) -> grain IterDataset
    params_init_fn: Callable | None = None       # rng -> boxed params (None = the decoder)
    load_params: Callable | None = None          # abstract params -> starting params
    with_reference: bool | str = False           # frozen copy (of a subtree) as state.frozen["reference"]
    frozen_extra: dict | None = None             # other frozen state (e.g. {"kl_coef": ...})
    frozen_subtrees: tuple[str, ...] = ()        # params entries moved to state.frozen (a teacher)
    evaluate: Callable[..., dict] | None = None  # (params, start_params) -> metrics
    summarize: Callable[..., dict] | None = None
    prepare: Callable[..., None] | None = None   # (start_params) -> None, before data is read
    # (state, host batch, *, step, next_batch) -> (train batch, metrics); next_batch() draws
    # more prompts from the same data iterator
    rollout: Callable[..., Any] | None = None


def load_tokenizer(config):
    return Tokenizer.from_file(config.data.tokenizer) if config.data.tokenizer else builtin_tokenizer()


def check_vocab(model_cfg: ModelConfig, tokenizer) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"config.model.vocab_size ({model_cfg.vocab_size}) is smaller than the "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size})")


def win_rate_names(config) -> list[str]:
    """config.eval.win_rate_by as a list of score names ([] = the evaluation's first)."""
    return [n.strip() for n in str(config.eval.get("win_rate_by", "") or "").split(",")
            if n.strip()]


def judge_win_rate_fn(config, prompts) -> Callable | None:
    """With "judge" among config.eval.win_rate_by: a `pairwise_fn` for `evaluate_policy`
    that has the pairwise judge of config.judge compare, per held-out prompt, the policy's
    sampled completion with the reference's under a principle drawn per prompt, giving
    {"judge": p(policy > reference)} (symmetric over the two orders, `Judge.pairwise`).
    The judge is loaded here, split over the run's mesh (config.mesh) like the policy.
    `prompts`: the held-out prompts as the judge reads them (text; a conversation's last
    user turn)."""
    if "judge" not in win_rate_names(config):
        return None
    spec = judges.judge_spec(config.judge)
    if spec.kind != "pairwise":
        raise ValueError("config.eval.win_rate_by names 'judge', which compares the policy's "
                         "completion with the reference's: config.judge.kind must be "
                         f"'pairwise', got {spec.kind!r}")
    judge = judges.cached_judge(spec, shd.make_mesh(config.mesh),
                                config.get("logical_axis_rules"))
    shown = [shown_prompt(p) for p in prompts]
    principles = judges.sample_principles(spec.principles, len(shown), config.seed + 1)

    def compare(indices, ours, theirs):
        # The same answer twice is an even verdict by construction (p = 1/2 exactly): only
        # differing pairs are judged (at a stage's start every pair is the same).
        prob = np.full(len(indices), 0.5)
        differ = [k for k in range(len(indices)) if ours[k] != theirs[k]]
        if differ:
            prob[differ] = judge.pairwise([shown[indices[k]] for k in differ],
                                          [ours[k] for k in differ], [theirs[k] for k in differ],
                                          [principles[indices[k]] for k in differ])["prob"]
        return {"judge": prob}
    return compare


def task_evaluator(config, model_cfg: ModelConfig, tokenizer, task):
    """Held-out gold reward, KL to the starting policy and completion length on a task
    (`task`, or for file data the built-in task config.eval.task names, if any)."""
    if task is None and config.eval.get("task"):
        task = get_task(config.eval.task)
    if task is None:
        return None
    if getattr(task, "environment", ""):  # a multi-turn task: held-out episodes
        rows = task.prompt_records(config.eval.num_prompts, seed=config.seed + 1, split="eval")
        evaluate = episode_evaluator(config, model_cfg, tokenizer, task, rows)
        if evaluate is not None:
            return evaluate
    prompts = task.prompts(config.eval.num_prompts, seed=config.seed + 1, split="eval")
    pairwise_fn = judge_win_rate_fn(config, prompts) if config.eval.get("win_rate") else None

    def evaluate(params, start_params):
        return evaluate_policy(params, model_cfg, tokenizer, task, prompts,
                               max_new_tokens=config.eval.max_new_tokens, seed=config.seed,
                               ref_params=start_params,
                               batch_size=config.eval.batch_size,
                               temperature=config.eval.temperature,
                               win_rate=bool(config.eval.get("win_rate", False)),
                               win_rate_by=win_rate_names(config), pairwise_fn=pairwise_fn)
    return evaluate


def report_skips(report, what: str = "training data") -> None:
    """Prints a SkipReport (file-level and tokenisation skips together) if it counted any."""
    if report.total:
        print(f"{what}: {report.summary()}", flush=True)


def report_truncation(report, data, what: str = "training data") -> None:
    """Prints what fitting the rows into the configured lengths cut (a TruncationReport),
    and a warning naming the config keys to raise when more than 1% of the rows were cut."""
    print(f"{what}: {report.summary()}; config.data.max_length={data.max_length}, "
          f"config.data.max_prompt_length={data.max_prompt_length}", flush=True)
    warning = report.warning(max_length=data.max_length,
                             max_prompt_length=data.max_prompt_length)
    if warning:
        print(f"warning: {what}: {warning}", flush=True)


def summarize_run(name: str, skip_report=None, truncation_report=None):
    """summary.json's entry; with `skip_report`, "skipped_rows": {reason: count}; with
    `truncation_report`, "truncated_rows": {"rows", "truncated", each kind, longest lengths}."""
    def summarize(evals, final_metrics):
        out = {"algo": name, "final_metrics": final_metrics, "evals": evals}
        if skip_report is not None:
            out["skipped_rows"] = dict(sorted(skip_report.counts.items()))
        if truncation_report is not None:
            out["truncated_rows"] = truncation_report.as_dict()
        if evals:
            out["initial"], out["final"] = evals[0], evals[-1]
            before = evals[0].get("gold_reward/greedy")
            after = evals[-1].get("gold_reward/greedy")
            if before is not None:
                print(f"[{name}] held-out gold reward (greedy): before {before:.3f} -> "
                      f"after {after:.3f}")
        return out
    return summarize


def load_start_params(config, into: str | None = None):
    """A `load_params` callable for AlgorithmSetup reading `config.init_from`.

    With `into`, the saved tree is placed into that subtree (e.g. a reward model's
    "decoder" initialised from an SFT model) and the rest is freshly initialised.
    """
    if not config.init_from:
        return None

    source = pretrained.find(config.init_from)

    def load(abstract_params):
        if into is None:
            return source.load(abstract_params)
        return {**{k: None for k in abstract_params}, into: source.load(abstract_params[into])}
    return load
