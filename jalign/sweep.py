"""Seeds as an axis: one config run over N seeds, and the spread of every number.

    python -m jalign.train --config=configs/quickstart.py --workdir=/tmp/qs --seeds=5

runs the config (one algorithm or a pipeline) with `config.seed = 0 .. N-1` in
WORKDIR/seed_K, each an ordinary run (rerunning the command resumes each one). The
seed sets the initialisation, the data order, sampling and the built-in tasks'
training examples and held-out prompts, so the spread covers the eval's prompt noise too.

WORKDIR/summary.json then holds, for every numeric metric of each stage's final eval
(`metrics`) and for every cell of the pipeline table (`table`), the per-seed values,
their mean, sample standard deviation (ddof=1) and a 95% t-interval over seeds:
mean +- t(0.975, N-1) * std / sqrt(N), the t quantile from scipy (a dependency of
jax). The table is printed as "mean ± half-width" and WORKDIR/curves.png plots each
stage's held-out evals against steps, the mean over seeds with the interval as a band.

`gains` says whether each stage beat the model it started from (a DPO or RL stage: the
SFT model) on every seed: per seed, the change of held-out gold reward from the stage's
first eval (its start model) to its last, and the standard error of that change,
sqrt(sem_start^2 + sem_final^2) (the two evals' standard errors over prompts, taken as
independent, which is conservative for the greedy score on the same prompts); a seed
counts as a win when the change exceeds `WIN_SES` (2) standard errors.

A string setting containing "{seed}" is formatted per seed, so a stage that starts
from a per-seed model sweeps with it, e.g.
`--config.init_from=/tmp/qs5/seed_{seed}/sft/final_params`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from scipy import stats

from jalign import loop, pipeline
from jalign.plots import EVAL_PANELS, plot_panels

CONFIDENCE = 0.95
WIN_SES = 2.0  # a seed's gain counts as a win above this many standard errors
GAIN_METRICS = ("gold_reward/sampled", "gold_reward/greedy")
INTERVAL = ("95% t-interval over seeds: mean +- t(0.975, n-1) * std / sqrt(n), "
            "std the sample standard deviation (ddof=1)")


def t_quantile(num_values: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile with num_values - 1 degrees of freedom."""
    return float(stats.t.ppf(0.5 + confidence / 2, num_values - 1))


def spread(values: Sequence[float]) -> dict[str, Any]:
    """{values, mean, std, half_width, low, high} of a 95% t-interval over the values."""
    x = np.asarray(values, np.float64)
    n = x.size
    if n < 2:
        raise ValueError(f"an interval over seeds needs at least 2 values, got {n}")
    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(n) * std / math.sqrt(n)
    return {"values": [float(v) for v in x], "mean": mean, "std": std, "half_width": half,
            "low": mean - half, "high": mean + half}


def stage_summaries(summary: dict, config) -> dict[str, dict]:
    """{stage: that stage's loop summary} of one run (a pipeline's or a single algorithm's)."""
    return dict(summary["stages"]) if "stages" in summary else {config.algo: summary}


def final_metrics(summary: dict, config) -> dict[str, dict[str, float]]:
    """{stage: {metric: value}}: the numeric metrics of each stage's final eval."""
    out = {}
    for stage, s in stage_summaries(summary, config).items():
        final = s.get("final") or {}
        out[stage] = {k: float(v) for k, v in final.items()
                      if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
    return out


def table_of(summary: dict, config) -> dict[str, dict[str, float]]:
    """The pipeline table of one run (a single algorithm: its final eval's row)."""
    if "table" in summary:
        return summary["table"]
    return {config.algo: pipeline.table_row(summary, "final")}


def stage_gains(summary: dict, config) -> dict[str, dict[str, dict[str, float]]]:
    """{stage: {metric: {start, final, gain, se}}} of one run, for each GAIN_METRICS
    metric a stage's first ("initial") and last ("final") evals both report with a _sem."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for stage, s in stage_summaries(summary, config).items():
        start, final = s.get("initial") or {}, s.get("final") or {}
        if start.get("step", 0) != 0:  # the first eval is not the start model's
            continue
        for m in GAIN_METRICS:
            if all(k in d for d in (start, final) for k in (m, f"{m}_sem")):
                out.setdefault(stage, {})[m] = {
                    "start": float(start[m]), "final": float(final[m]),
                    "gain": float(final[m]) - float(start[m]),
                    "se": math.hypot(float(start[f"{m}_sem"]), float(final[f"{m}_sem"]))}
    return out


def combine_gains(per_seed: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """Per-seed stage_gains -> {stage: {metric: {gain: spread over seeds, se: per-seed
    standard errors, wins: seeds whose gain > WIN_SES * se, num_seeds}}}."""
    out: dict[str, Any] = {}
    for stage, metrics in per_seed[0].items():
        for m in metrics:
            if not all(m in s.get(stage, {}) for s in per_seed):
                continue
            gains = [s[stage][m]["gain"] for s in per_seed]
            ses = [s[stage][m]["se"] for s in per_seed]
            out.setdefault(stage, {})[m] = {
                "gain": spread(gains), "se": ses,
                "start": spread([s[stage][m]["start"] for s in per_seed]),
                "wins": int(sum(g > WIN_SES * e for g, e in zip(gains, ses))),
                "num_seeds": len(per_seed)}
    return out


def format_gains(gains: dict[str, Any]) -> str:
    """One line per stage and metric: mean gain ± half-width, and the seeds it won."""
    lines = []
    for stage, metrics in gains.items():
        for m, g in metrics.items():
            lines.append(f"{stage:<10} {m:<21} gain over its start {g['gain']['mean']:+.3f} ± "
                         f"{g['gain']['half_width']:.3f}, above {WIN_SES:g} standard errors "
                         f"on {g['wins']}/{g['num_seeds']} seeds "
                         f"(per seed: {', '.join(f'{v:+.3f}' for v in g['gain']['values'])})")
    return "\n".join(lines)


def _spread_nested(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict]]:
    """Per-seed {row: {key: value}} -> {row: {key: spread}} over keys every seed has."""
    out: dict[str, dict[str, dict]] = {}
    for row in per_seed[0]:
        keys = [k for k in per_seed[0][row] if all(k in s.get(row, {}) for s in per_seed)]
        out[row] = {k: spread([s[row][k] for s in per_seed]) for k in keys}
    return out


def combine(summaries: Sequence[dict], config, seeds: Sequence[int]) -> dict[str, Any]:
    """The combined summary of the runs of `seeds` (see the module docstring)."""
    return {"seeds": list(seeds), "runs": [f"seed_{k}" for k in seeds], "interval": INTERVAL,
            "t_quantile": t_quantile(len(seeds)),
            "metrics": _spread_nested([final_metrics(s, config) for s in summaries]),
            "table": _spread_nested([table_of(s, config) for s in summaries]),
            "gains": combine_gains([stage_gains(s, config) for s in summaries])}


def format_table(table: dict[str, dict[str, dict]]) -> str:
    """pipeline.COLUMNS as "mean ± half-width" cells."""
    width = 18
    header = f"{'model':<10}" + "".join(f"{title:>{width}}" for _, title in pipeline.COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in table.items():
        cells = "".join(f"{row[k]['mean']:.3f} ± {row[k]['half_width']:.3f}".rjust(width)
                        if k in row else f"{'-':>{width}}" for k, _ in pipeline.COLUMNS)
        lines.append(f"{name:<10}{cells}")
    return "\n".join(lines)


def seed_curves(summaries: Sequence[dict], config) -> dict[str, dict[str, dict[str, dict]]]:
    """Each stage's held-out evals over seeds, at the steps every seed evaluated:
    {stage: {panel: {metric: {"step", "value" (mean), "low", "high" (95% t-interval)}}}}."""
    per_seed = [stage_summaries(s, config) for s in summaries]
    data: dict[str, dict[str, dict[str, dict]]] = {}
    for stage in per_seed[0]:
        evals = [s[stage].get("evals") or [] for s in per_seed]
        panels = {}
        for title, keys in EVAL_PANELS.items():
            series = {}
            for key in keys:
                by_seed = [{e["step"]: e[key] for e in run if key in e} for run in evals]
                steps = sorted(set.intersection(*(set(d) for d in by_seed)))
                if not steps:
                    continue
                spreads = [spread([d[t] for d in by_seed]) for t in steps]
                series[key] = {"step": steps, "value": [s["mean"] for s in spreads],
                               "low": [s["low"] for s in spreads],
                               "high": [s["high"] for s in spreads]}
            panels[title] = series
        data[stage] = panels
    return data


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(config)
    cfg.seed = seed
    _format_seed(cfg, seed)
    return cfg


def _format_seed(cfg: ml_collections.ConfigDict, seed: int) -> None:
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            _format_seed(value, seed)
        elif isinstance(value, str) and "{seed}" in value:
            cfg[key] = value.replace("{seed}", str(seed))


def _run_one(config, workdir: str) -> dict:
    if config.pipeline.stages:
        return pipeline.run_pipeline(config, workdir)
    return loop.run(config, workdir)


def run_seeds(config: ml_collections.ConfigDict, workdir: str, num_seeds: int, *,
              run_fn: Callable[[Any, str], dict] = _run_one) -> dict[str, Any]:
    """Runs `config` with seeds 0 .. num_seeds-1 in WORKDIR/seed_K (`run_fn(config,
    workdir)`, by default the pipeline or the one algorithm it configures), then writes
    the combined WORKDIR/summary.json and curves.png and prints the table."""
    if num_seeds < 2:
        raise ValueError(f"--seeds={num_seeds}: an interval over seeds needs at least 2 seeds")
    seeds = list(range(num_seeds))
    summaries = []
    for seed in seeds:
        print(f"=== seed {seed} of {num_seeds} ===", flush=True)
        summaries.append(run_fn(seed_config(config, seed), os.path.join(workdir, f"seed_{seed}")))
    out = combine(summaries, config, seeds)
    if jax.process_index() == 0:
        print(f"{num_seeds} seeds, {INTERVAL}:")
        print(format_table(out["table"]))
        if out["gains"]:
            print(format_gains(out["gains"]))
        plot_panels(seed_curves(summaries, config), os.path.join(workdir, "curves.png"),
                    title=f"mean over {num_seeds} seeds, band: 95% t-interval")
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(out, f, indent=2)
    return out
