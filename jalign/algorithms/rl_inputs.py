"""The inputs of an online-RL run: prompt records, reward functions, held-out evaluation.

Prompts come from a built-in task (its reference answers as the "answer" column)
or from the user's JSONL / Parquet files (`config.data.path`, held-out prompts in
`config.data.eval_path`), each row with any other columns, which travel to the
reward functions (jalign.algorithms.reward_sources).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from jalign import sharding as shd
from jalign.algorithms.common import (check_vocab, load_tokenizer, report_skips,
                                      report_truncation, win_rate_names,
                                      judge_win_rate_fn)
from jalign.algorithms.episodes import episode_evaluator
from jalign.algorithms.reward_sources import (CombinedReward, build_sources, check_columns,
                                              combine_ensemble, judge_reward, task_gold_reward)
from jalign.algorithms.rl_spec import RlSpec
from jalign.best_of_n import best_of_n_metrics, sample_best_of_n
from jalign.checkpoint import load_params
from jalign.data import SkipReport, TruncationReport, load_records
from jalign.data.prompts import (PROMPT_IDS_KEY, make_prompt_dataset, prepare_prompt_records,
                                 reward_columns)
from jalign.data.sft import tokenize_prompt_completion
from jalign.data.sources import ORIGIN_KEY
from jalign.evaluate import evaluate_policy
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn, sequence_scores
from jalign.tasks import get_task


@dataclasses.dataclass
class RlInputs:
    """What every online algorithm samples from and scores with, built once."""
    tokenizer: Any
    task: Any                     # the built-in task, or None for file data
    records: list[dict]           # training prompts with their columns, prepared
    eval_records: list[dict]      # held-out prompts (task split "eval", or config.data.eval_path)
    reward: CombinedReward
    skip_report: SkipReport
    # training prompts' rows and longest prompt (prompts are never cut: too long is a skip)
    truncation_report: TruncationReport = dataclasses.field(default_factory=TruncationReport)


def _task_records(task, n: int, *, seed: int, split: str) -> list[dict]:
    """A task's prompts as records with the reference answer as their "answer" column."""
    return [{**row, ORIGIN_KEY: f"task {task.name} ({split}) #{i}"}
            for i, row in enumerate(task.prompt_records(n, seed=seed, split=split))]


def _file_records(config, paths: str) -> tuple[list[dict], SkipReport]:
    return load_records([p for p in paths.split(",") if p], required_fields=("prompt",),
                        on_bad_row=config.data.on_bad_row)


def rl_inputs(config, spec: RlSpec, model_cfg: ModelConfig) -> RlInputs:
    """Prompt records (train and held-out), their tokenisation and the reward functions.

    Bad rows (unreadable, prompts longer than config.data.max_prompt_length, or than
    max_length when that is 0, failing chat templates) are raised with file:line or
    counted as skips; a column a reward function requires that the data
    lacks fails here, before any sampling.
    """
    data = config.data
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
    report, held_report = SkipReport(), SkipReport()
    task = None
    if data.source == "task":
        task = get_task(data.task)
        train = _task_records(task, data.num_train_examples, seed=config.seed, split="train")
        held = _task_records(task, config.eval.num_prompts, seed=config.seed + 1, split="eval")
        where = f"the built-in task {task.name!r}"
    else:
        if not data.path:
            raise ValueError(f"config.data.path must name the {data.source} prompt file(s)")
        train, report = _file_records(config, data.path)
        held, held_report = _file_records(config, data.eval_path) if data.eval_path else ([], held_report)
        where = data.path
    # Prompts are never cut: one longer than the limit is a counted skip (or an error).
    limit = ("max_prompt_length", data.max_prompt_length) if data.max_prompt_length else (
        "max_length", data.max_length)
    prepare = dict(max_prompt_length=limit[1], limit_name=f"config.data.{limit[0]}",
                   on_bad_row=data.on_bad_row)
    truncated = TruncationReport()
    train = prepare_prompt_records(train, tokenizer, skip_report=report,
                                   truncation_report=truncated, **prepare)
    held = prepare_prompt_records(held, tokenizer, skip_report=held_report, **prepare) if held else []
    report_skips(report)
    report_skips(held_report, "held-out data")
    report_truncation(truncated, data, "training prompts")
    reward = build_sources(spec.reward_sources, spec.reward_weights,
                           gold=task_gold_reward(task) if task is not None else None,
                           reward_model=lambda: reward_model_fn(spec, model_cfg, tokenizer,
                                                                 data.max_length),
                           judge=lambda: judge_reward(
                               config.judge, shd.make_mesh(config.mesh),
                               config.get("logical_axis_rules")))
    columns = list(reward_columns(train)) + (["conversation"] if spec.episodes else [])
    check_columns(reward.sources, columns, where)
    return RlInputs(tokenizer, task, train, held, reward, report, truncated)


# One compile per model config and batch shape, shared by every reward model built.
_sequence_scores = jax.jit(sequence_scores, static_argnums=(1, 3))


def reward_model_fn(spec: RlSpec, model_cfg, tokenizer, max_length: int) -> Callable:
    """The trained reward model(s) of config.rl.reward_model as one reward function."""
    if not spec.reward_model.strip(" ,"):
        raise ValueError("reward source 'model' needs config.rl.reward_model (a reward stage's "
                         "WORKDIR/final_params, or a comma list of them for an ensemble)")
    return reward_ensemble_fn([p.strip() for p in spec.reward_model.split(",") if p.strip()],
                              model_cfg, tokenizer, max_length, combine=spec.reward_ensemble,
                              lam=spec.reward_ensemble_lambda)


def reward_ensemble_fn(paths, model_cfg, tokenizer, max_length: int, *, combine: str = "mean",
                       lam: float = 1.0) -> Callable:
    """Saved reward models (one architecture, `model_cfg`) as one reward function: each
    scores every sample, `combine_ensemble(scores, combine, lam=lam)` makes one score."""
    abstract = nn.meta.unbox(jax.eval_shape(scalar_model_init_fn(model_cfg), jax.random.PRNGKey(0)))
    members = [load_params(path, abstract) for path in paths]

    def reward_model(prompts, completions, **columns):
        del columns
        rows = [tokenize_prompt_completion(p, c, tokenizer, max_length=max_length)["tokens"]
                for p, c in zip(prompts, completions)]
        width = -(-max(len(r) for r in rows) // 16) * 16
        tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
        seq = np.full((len(rows), width), -1, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
            seq[i, :len(r)] = i
        batch = {"tokens": tokens, "segment_ids": (seq >= 0).astype(np.int32),
                 "positions": np.tile(np.arange(width, dtype=np.int32), (len(rows), 1)),
                 "sequence_index": seq}
        scores_KxN = np.stack([np.asarray(_sequence_scores(params, model_cfg, batch, len(rows)))
                               for params in members])
        return [float(x) for x in combine_ensemble(scores_KxN, combine, lam=lam)]
    return reward_model


def rl_evaluator(config, model_cfg: ModelConfig, spec: RlSpec, inputs: RlInputs):
    """(params, start_params) -> held-out metrics: the task's gold reward (as every
    algorithm reports it) and, unless "gold" is the only source, each reward function's
    mean over greedy and sampled completions (reward/greedy, rewards/NAME/greedy, ...);
    with config.eval.win_rate (single-turn only), the win rates against the start policy
    by the gold reward, or by the reward functions' total where there is no task."""
    held = inputs.eval_records
    if not held:
        return None
    task, reward = inputs.task, inputs.reward
    by_functions = tuple(spec.reward_sources) != ("gold",)
    if spec.episodes is not None:
        return episode_evaluator(config, model_cfg, inputs.tokenizer, task, held,
                                 reward=reward if by_functions else None)

    def score_fn(indices, completions, lengths):
        rows = [held[i] for i in indices]
        out = {}
        if task is not None:
            out["gold_reward"] = task.gold_reward([r["prompt"] for r in rows], completions)
        if by_functions:
            total, per_function = reward.scores(rows, [r["prompt"] for r in rows], completions,
                                                lengths)
            out["reward"] = total
            out.update({f"rewards/{name}": values for name, values in per_function.items()})
        return out

    pairwise_fn = (judge_win_rate_fn(config, [r["prompt"] for r in held])
                   if config.eval.get("win_rate") else None)

    def evaluate(params, start_params):
        return evaluate_policy(params, model_cfg, inputs.tokenizer, task,
                               [r["prompt"] for r in held], score_fn=score_fn,
                               prompt_ids=[r[PROMPT_IDS_KEY] for r in held],
                               max_new_tokens=config.eval.max_new_tokens, seed=config.seed,
                               ref_params=start_params, batch_size=config.eval.batch_size,
                               temperature=config.eval.temperature,
                               win_rate=bool(config.eval.get("win_rate", False)),
                               win_rate_by=win_rate_names(config), pairwise_fn=pairwise_fn)
    return evaluate


def best_of_n_evaluator(config, model_cfg: ModelConfig, inputs: RlInputs, *, n: int):
    """params -> (best_of_n/* metrics, the BestOfN samples) on the held-out prompts: n samples
    each (config.eval's max_new_tokens, temperature, batch_size), the best by the run's
    reward (config.rl.reward_sources, weighted: gold, a reward model, an ensemble, WARM,
    a verifier), its gold reward when the prompts are a built-in task's."""
    held = inputs.eval_records
    if not held:
        raise ValueError("best-of-n needs held-out prompts (a built-in task or "
                         "config.data.eval_path)")

    def score_fn(indices, completions, lengths):
        rows = [held[i] for i in indices]
        total, _ = inputs.reward.scores(rows, [r["prompt"] for r in rows], completions, lengths)
        return total

    gold = inputs.task.gold_reward if inputs.task is not None else None

    def evaluate(params):
        samples = sample_best_of_n(params, model_cfg, inputs.tokenizer,
                                   [r[PROMPT_IDS_KEY] for r in held], score_fn, n=n,
                                   max_new_tokens=config.eval.max_new_tokens, seed=config.seed,
                                   temperature=config.eval.temperature,
                                   batch_size=config.eval.batch_size)
        return best_of_n_metrics(samples, [r["prompt"] for r in held], gold), samples
    return evaluate


def prompt_dataset(config, records):
    batch_size = config.data.batch_size

    def dataset(process_index, process_count):
        if batch_size % process_count:
            raise ValueError(f"config.data.batch_size ({batch_size}) must be divisible by the "
                             f"number of processes ({process_count})")
        return make_prompt_dataset(records, batch_size=batch_size // process_count,
                                   seed=config.seed, shard_index=process_index,
                                   shard_count=process_count)
    return dataset
