"""Multi-stage runs (e.g. SFT -> reward model -> DPO) from one config and one command.

`config.pipeline.stages = "sft,reward,dpo"` runs each stage with the one training
loop in WORKDIR/<stage>, each later stage starting from the SFT stage's model.
`config.pipeline.<stage>` holds that stage's overrides in the config's own shape,
e.g. `config.pipeline.dpo.train.num_steps = 100`. The summary table (gold reward,
preference accuracy, KL, completion length for base, SFT and the aligned models)
is printed and written to WORKDIR/summary.json, the curves (training metrics, held-out
gold reward with its error band and KL to the start, per stage) to WORKDIR/curves.png.

A stage may be named, `NAME=ALGO` (e.g. "teacher=sft,sft,distill"): it runs ALGO in
WORKDIR/NAME with the overrides `config.pipeline.NAME` (a model of another size, for
one); only the stage named "sft" becomes the later stages' start. A string setting
"stage:NAME" in a stage's config names an earlier stage's WORKDIR (e.g.
`config.distill.teacher = "stage:teacher"`); "stage:NAME/FILE" names a file in it.

A stage that trains nothing runs its function instead of the loop: `label` (jalign.label)
samples from the current start model, has a judge label pairs and writes
WORKDIR/label/pairs.jsonl, which a later stage reads with
`config.data.path = "stage:label/pairs.jsonl"` (configs/cai_tiny.py); `revise`
(jalign.revise) has the judge's model critique and revise the start model's samples and
writes WORKDIR/revise/revisions.jsonl for an SFT stage (Constitutional AI's supervised
step, `configs/cai_tiny.py:critique`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from jalign import label, loop, revise
from jalign.algorithms import ALGOS, get_algorithm
from jalign.config_utils import resolve_start, validate_config
from jalign.plots import plot_curves

COLUMNS = (("gold_reward/greedy", "gold (greedy)"), ("gold_reward/sampled", "gold (sampled)"),
           ("accuracy", "pref. acc."), ("kl/ref", "KL to start"),
           ("completions/mean_length", "length"))
# Shown when a stage reports them: multi-turn episodes' tool calls and turns per episode.
EPISODE_COLUMNS = (("env/tool_calls", "tool calls"), ("env/turns", "turns"))


def _merge(target: ml_collections.ConfigDict, overrides: Any, prefix: str) -> None:
    for key, value in overrides.items():
        if key not in target:
            raise ValueError(f"config.pipeline.{prefix}{key} overrides an unknown key")
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            _merge(target[key], value, f"{prefix}{key}.")
        else:
            target[key] = value


STAGE_PREFIX = "stage:"
# Stages that train nothing: algorithm name -> (spec(config), run(config, workdir) -> summary).
NON_TRAINING = {"label": (label.spec, label.run_label),
                "revise": (revise.spec, revise.run_revise)}
STAGE_ALGOS = ALGOS + tuple(NON_TRAINING)


def stage_algo(stage: str) -> tuple[str, str]:
    """(name, algorithm) of a `config.pipeline.stages` entry, "ALGO" or "NAME=ALGO"."""
    name, _, algo = stage.partition("=")
    return (name.strip(), algo.strip()) if algo else (name.strip(), name.strip())


def _stage_paths(cfg: ml_collections.ConfigDict, workdir: str | None, names: list[str],
                 earlier: list[str], prefix: str = "") -> None:
    """Replaces "stage:NAME" strings naming an earlier stage with WORKDIR/NAME. A later
    stage's name stays as it is (a setting this stage does not read, e.g. the teacher
    stage's own copy of config.distill.teacher); a name that is no stage is an error."""
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            _stage_paths(value, workdir, names, earlier, f"{prefix}{key}.")
        elif isinstance(value, str) and value.startswith(STAGE_PREFIX):
            name, _, within = value[len(STAGE_PREFIX):].partition("/")
            if name not in names:
                raise ValueError(f"config.{prefix}{key}={value!r} names no stage of "
                                 f"config.pipeline.stages (stages: {names})")
            if name in earlier and workdir is not None:
                cfg[key] = os.path.join(workdir, name, within) if within else os.path.join(
                    workdir, name)


def stage_config(config: ml_collections.ConfigDict, stage: str, init_from: str,
                 workdir: str | None = None):
    """The config of one stage ("ALGO" or "NAME=ALGO"); "stage:NAME" strings become
    WORKDIR/NAME when `workdir` is given (checked either way)."""
    name, algo = stage_algo(stage)
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.pipeline.stages = ""
    cfg.algo = algo
    cfg.init_from = init_from
    overrides = config.pipeline.get(name)
    if overrides:
        _merge(cfg, overrides.to_dict(), f"{name}.")
    for key in list(cfg.pipeline.keys()):
        if key != "stages":
            del cfg.pipeline[key]
    names = [stage_algo(s)[0] for s in stages_of(config)]
    _stage_paths(cfg, workdir, names, names[:names.index(name)] if name in names else [])
    return cfg


def table_row(summary: dict, which: str) -> dict[str, float]:
    entry = dict(summary.get(which) or {})
    for key in ("eval_rewards/accuracies", "eval_accuracy"):
        if key in entry:
            entry["accuracy"] = entry[key]
    return {k: entry[k] for k, _ in COLUMNS + EPISODE_COLUMNS if k in entry}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    columns = COLUMNS + tuple(c for c in EPISODE_COLUMNS if any(c[0] in r for r in rows.values()))
    header = f"{'model':<10}" + "".join(f"{title:>16}" for _, title in columns)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        cells = "".join(f"{row[k]:>16.3f}" if k in row else f"{'-':>16}" for k, _ in columns)
        lines.append(f"{name:<10}{cells}")
    return "\n".join(lines)


def stages_of(config: ml_collections.ConfigDict) -> list[str]:
    return [s.strip() for s in config.pipeline.stages.split(",") if s.strip()]


def validate_pipeline(config: ml_collections.ConfigDict) -> None:
    """Checks every stage's config (names, `config.pipeline.<stage>` overrides, values and
    the algorithm's own sections) before the first stage trains."""
    validate_config(config, algorithms=STAGE_ALGOS)
    config, _ = resolve_start(config)  # the first stage's model; later ones inherit it
    stages = stages_of(config)
    names = [stage_algo(s)[0] for s in stages]
    if len(set(names)) < len(names):
        raise ValueError(f"config.pipeline.stages={config.pipeline.stages!r} names a stage twice; "
                         "name one of them, NAME=ALGO (each stage has its own WORKDIR/NAME)")
    unknown = [k for k in config.pipeline.keys()
               if k != "stages" and k not in STAGE_ALGOS and k not in names]
    if unknown:
        raise ValueError(f"config.pipeline.{unknown[0]} is not an algorithm's or a stage's "
                         f"overrides; valid: {sorted(set(STAGE_ALGOS) | set(names))}")
    for stage in stages:
        cfg = stage_config(config, stage, config.init_from)
        validate_config(cfg, algorithms=STAGE_ALGOS)
        if cfg.algo in NON_TRAINING:
            NON_TRAINING[cfg.algo][0](cfg)
        else:
            get_algorithm(cfg.algo).spec(cfg)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs `config.pipeline.stages` in order with the one training loop (see the module
    docstring); every stage's config is validated before the first one trains."""
    validate_pipeline(config)
    stages = stages_of(config)
    os.makedirs(workdir, exist_ok=True)
    summaries: dict[str, Any] = {}
    start_model = config.init_from
    trained = []  # the stages with curves and a row in the table
    for stage in stages:
        name = stage_algo(stage)[0]
        print(f"=== stage {name} ===")
        cfg = stage_config(config, stage, start_model, workdir)
        run = NON_TRAINING[cfg.algo][1] if cfg.algo in NON_TRAINING else loop.run
        summaries[name] = run(cfg, os.path.join(workdir, name))
        if cfg.algo not in NON_TRAINING:
            trained.append(name)
        if name == "sft":
            start_model = os.path.join(workdir, "sft", "final_params")

    rows = {}
    if "sft" in summaries:
        rows["base"] = table_row(summaries["sft"], "initial")
    for stage in trained:
        rows[stage] = table_row(summaries[stage], "final")
    out = {"stages": summaries, "table": rows}
    if jax.process_index() == 0:
        print(format_table(rows))
        plot_curves(workdir, trained, os.path.join(workdir, "curves.png"))
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(out, f, indent=2)
    return out
