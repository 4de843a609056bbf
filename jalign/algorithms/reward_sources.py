"""The reward functions of an online-RL run, called with TRL's convention.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`:
batched, the rows' other dataset columns as keyword lists (plus
`completion_lengths`, the number of generated tokens), and `None` where the
function cannot score a sample (left out of that function's mean, and adding 0 to
the weighted sum, as TRL does). `config.rl.reward_sources` names them: "gold" (a
built-in task's gold reward), "model" (a trained jalign reward model,
`config.rl.reward_model`, or an ensemble of them: a comma list combined by
`config.rl.reward_ensemble`, see `combine_ensemble`), "judge" (a pointwise language-model
judge, `config.judge`, see `jalign.judges`), a built-in of `jalign.rewards` ("math_answer",
"think_answer_format", "soft_overlong:max=..,cache=..", ...) or
"python:module.function"; `config.rl.reward_weights` weights them.

Each function's failures are named: one that raises is re-run row by row to name
the first row (file:line) it fails on; a wrong length, a string or a NaN is an
error naming the function and the row; a column a function requires that the
data lacks is an error at setup, before any sampling.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from jalign import judges, rewards
from jalign.data.prompts import reward_columns
from jalign.data.sources import ORIGIN_KEY

# Keywords jalign itself passes to every reward function, besides the data's columns.
TRAINER_COLUMNS = ("completion_lengths",)


# How an ensemble of reward models (config.rl.reward_ensemble) combines its members' scores.
ENSEMBLE_COMBINATIONS = ("mean", "uncertainty", "min")


def combine_ensemble(scores_KxN, how: str = "mean", *, lam: float = 1.0) -> np.ndarray:
    """k reward models' scores of N samples -> one float32 score per sample.

    "mean": the members' mean; "uncertainty": mean - lam * std, the std over the k
    members (ddof=0: the members are the whole ensemble, and one member is the model
    itself), Coste et al. 2023's uncertainty-weighted optimisation with the std as
    the uncertainty; "min": the worst case, Coste et al.'s worst-case optimisation.

    References: Coste, Anwar, Kirk, Krueger, "Reward Model Ensembles Help Mitigate
    Overoptimization", arXiv:2310.02743.
    """
    scores = np.asarray(scores_KxN, np.float64)
    if how == "mean":
        out = scores.mean(0)
    elif how == "uncertainty":
        out = scores.mean(0) - lam * scores.std(0)
    elif how == "min":
        out = scores.min(0)
    else:
        raise ValueError(f"config.rl.reward_ensemble = {how!r} is not valid; "
                         f"valid: {list(ENSEMBLE_COMBINATIONS)}")
    return out.astype(np.float32)


class RewardFunctionError(ValueError):
    """A reward function failed or returned something that is not a list of scores."""


@dataclasses.dataclass(frozen=True)
class RewardSource:
    name: str                          # metrics: rewards/<name>/mean, rewards/<name>/std
    fn: Callable
    weight: float
    takes_any_column: bool             # fn has **kwargs
    parameters: tuple[str, ...]        # keyword parameters fn names (beyond prompts, completions)
    required: tuple[str, ...]          # ... of which these have no default

    @classmethod
    def of(cls, name: str, fn: Callable, weight: float) -> "RewardSource":
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin / C callable: pass every column
            return cls(name, fn, weight, True, (), ())
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        named = [p for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        required = tuple(p.name for p in named if p.default is p.empty)
        return cls(name, fn, weight, takes_any, tuple(p.name for p in named), required)

    def kwargs(self, columns: Mapping[str, list]) -> dict[str, list]:
        if self.takes_any_column:
            return dict(columns)
        return {k: v for k, v in columns.items() if k in self.parameters}


def check_columns(sources: Sequence[RewardSource], columns: Sequence[str], where: str) -> None:
    """Raises naming the data (`where`), the column and the function for every column a
    function requires that neither the data nor the trainer provides."""
    available = set(columns) | set(TRAINER_COLUMNS)
    for source in sources:
        missing = [c for c in source.required if c not in available]
        if missing:
            raise ValueError(
                f"reward function {source.name!r} needs the column {missing[0]!r}, which "
                f"{where} does not have (its columns: {sorted(columns) or 'none but prompt'})")


def _origin(record: Mapping, index: int) -> str:
    return record.get(ORIGIN_KEY, f"row {index}")


def _call(source: RewardSource, prompts, completions, columns, records) -> list[float | None]:
    """One function on the batch; its output checked; a raise named by its first bad row."""
    n = len(prompts)
    try:
        out = source.fn(list(prompts), list(completions), **source.kwargs(columns))
    except Exception as e:  # noqa: BLE001 -- re-raised below with the row named
        for i in range(n):  # find the row it fails on
            try:
                source.fn([prompts[i]], [completions[i]],
                          **source.kwargs({k: [v[i]] for k, v in columns.items()}))
            except Exception as row_error:  # noqa: BLE001
                raise RewardFunctionError(
                    f"reward function {source.name!r} raised {type(row_error).__name__}: "
                    f"{row_error} on {_origin(records[i], i)} (prompt {prompts[i][:60]!r})"
                ) from row_error
        raise RewardFunctionError(f"reward function {source.name!r} raised "
                                  f"{type(e).__name__}: {e} on a batch of {n} rows") from e
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise RewardFunctionError(f"reward function {source.name!r} returned "
                                  f"{type(out).__name__}, not a list of {n} floats")
    out = list(out)
    if len(out) != n:
        raise RewardFunctionError(f"reward function {source.name!r} returned {len(out)} scores "
                                  f"for {n} completions")
    for i, value in enumerate(out):
        if value is None:
            continue
        if isinstance(value, (str, bytes, bool)) or not isinstance(value, (int, float, np.number)):
            raise RewardFunctionError(
                f"reward function {source.name!r} returned {value!r} "
                f"({type(value).__name__}) for {_origin(records[i], i)}; expected a float or None")
        if not math.isfinite(float(value)):
            raise RewardFunctionError(
                f"reward function {source.name!r} returned {value} for {_origin(records[i], i)}; "
                "return None for a sample it cannot score")
        out[i] = float(value)
    return out


class CombinedReward:
    """Calls every source on a batch; the weighted sum and TRL's per-function metrics."""

    def __init__(self, sources: Sequence[RewardSource]):
        self.sources = list(sources)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def scores(self, records: Sequence[Mapping], prompts: Sequence[str],
               completions: Sequence[str], completion_lengths: Sequence[int]):
        """(weighted sum float32 [N], {name: float32 [N] with NaN where it returned None})."""
        columns = reward_columns(records)
        columns["completion_lengths"] = [int(n) for n in completion_lengths]
        total = np.zeros(len(prompts), np.float32)
        per_function = {}
        for source in self.sources:
            values = np.asarray([np.nan if v is None else v for v in
                                 _call(source, prompts, completions, columns, records)], np.float32)
            total += source.weight * np.nan_to_num(values, nan=0.0)
            per_function[source.name] = values
        return total, per_function

    def __call__(self, records: Sequence[Mapping], prompts: Sequence[str],
                 completions: Sequence[str], completion_lengths: Sequence[int]):
        """(scores float32 [N], metrics) for N samples; `records[i]` is sample i's row.

        Metrics (TRL's names): rewards/<name>/mean and /std over the samples the
        function scored, reward and reward_std of the weighted sum.
        """
        total, per_function = self.scores(records, prompts, completions, completion_lengths)
        metrics: dict[str, float] = {}
        for name, values in per_function.items():
            scored = values[~np.isnan(values)]
            if scored.size:
                metrics[f"rewards/{name}/mean"] = float(scored.mean())
                metrics[f"rewards/{name}/std"] = float(scored.std())
        metrics["reward"] = float(total.mean())
        metrics["reward_std"] = float(total.std())
        return total, metrics


def build_sources(spec_sources: Sequence[str], weights: Sequence[float], *,
                  gold: Callable | None, reward_model: Callable[[], Callable],
                  judge: Callable[[], Callable] | None = None) -> CombinedReward:
    """`config.rl.reward_sources` as reward functions (see the module docstring).

    `gold`: the built-in task's gold reward in TRL's convention (None when the data is
    not a task); `reward_model()`: builds the trained reward model's function;
    `judge()`: builds the pointwise judge's (e.g. `judge_reward(config.judge)`).
    """
    sources = []
    for source, weight in zip(spec_sources, weights):
        if source == "gold":
            if gold is None:
                raise ValueError("reward source 'gold' needs a built-in task "
                                 "(config.data.source='task'); for your own data use a "
                                 "verifier such as 'math_answer' or 'python:module.function'")
            sources.append(RewardSource.of("gold", gold, weight))
        elif source == "model":
            sources.append(RewardSource.of("model", reward_model(), weight))
        elif source == "judge":
            if judge is None:
                raise ValueError("reward source 'judge' is not available here")
            sources.append(RewardSource.of("judge", judge(), weight))
        else:
            name, fn = rewards.resolve(source)
            sources.append(RewardSource.of(name, fn, weight))
    names = [s.name for s in sources]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ValueError(f"config.rl.reward_sources names {duplicate!r} twice")
    return CombinedReward(sources)


def task_gold_reward(task) -> Callable:
    """A built-in task's gold reward in TRL's calling convention."""
    def gold(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        del columns
        return [float(x) for x in task.gold_reward(prompts, completions)]
    gold.__name__ = f"{task.name}_gold"
    return gold


def judge_reward(judge_config, mesh=None, rules=None) -> Callable:
    """`config.judge` (kind "pointwise") as a reward function: each completion's judge
    score, the mean over the constitution's principles (`jalign.judges.Judge.pointwise`);
    the judge's weights split over `mesh` (the policy's) by `rules`, None: one device."""
    spec = judges.judge_spec(judge_config)
    if spec.kind != "pointwise":
        raise ValueError("reward source 'judge' scores each completion alone: set "
                         f"config.judge.kind='pointwise' (it is {spec.kind!r})")
    judge = judges.cached_judge(spec, mesh, rules)

    def judge_score(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        del columns
        shown = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return [float(x) for x in judge.pointwise([p.strip() for p in shown], completions)]
    return judge_score
