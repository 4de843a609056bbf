"""Training curves a reader looks at: the losses, and what they are for.

One figure, one column per stage, rows: the stage's training metrics (metrics.jsonl),
its held-out gold reward, greedy and sampled with +-1 sem bands, KL to the model the
stage started from and preference accuracy on held-out pairs (evals.jsonl). The
margins of a preference stage can rise while its gold reward collapses; the rows
below them show it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

# Training metrics plotted per algorithm (the loss for any other).
TRAIN_KEYS = {"sft": ("loss",), "reward": ("loss", "accuracy"),
              "dpo": ("loss", "rewards/margins"), "kto": ("loss", "rewards/margins")}
# Held-out rows: title -> eval metrics drawn there (each with its NAME_sem band if logged).
EVAL_PANELS = {"held-out gold reward": ("gold_reward/greedy", "gold_reward/sampled"),
               "KL to start": ("kl/ref",),
               "held-out preference accuracy": ("eval_accuracy", "eval_rewards/accuracies")}


def _records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict], key: str) -> dict[str, list] | None:
    rows = [r for r in records if key in r]
    if not rows:
        return None
    out = {"step": [r["step"] for r in rows], "value": [r[key] for r in rows]}
    if all(f"{key}_sem" in r for r in rows):
        out["sem"] = [r[f"{key}_sem"] for r in rows]
    return out


def curve_data(workdir: str, stages: list[str]) -> dict[str, dict[str, dict[str, dict]]]:
    """{stage: {panel: {metric: {"step", "value"[, "sem"]}}}} read from each stage's
    WORKDIR/<stage>/metrics.jsonl (panel "training") and evals.jsonl (EVAL_PANELS)."""
    data: dict[str, dict[str, dict[str, dict]]] = {}
    for stage in stages:
        train = _records(os.path.join(workdir, stage, "metrics.jsonl"))
        evals = _records(os.path.join(workdir, stage, "evals.jsonl"))
        panels = {"training": {k: s for k in TRAIN_KEYS.get(stage, ("loss",))
                               if (s := _series(train, k))}}
        for title, keys in EVAL_PANELS.items():
            panels[title] = {k: s for k in keys if (s := _series(evals, k))}
        data[stage] = panels
    return data


def plot_panels(data: dict[str, dict[str, dict[str, dict]]], path: str,
                title: str = "") -> list[str]:
    """Draws `curve_data`'s shape (a series may carry "low"/"high" band edges instead of
    a "sem") as one figure: a column per stage, a row per panel any stage has; returns
    the rows' titles."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the non-interactive backend

    stages = list(data)
    rows = [p for p in ("training", *EVAL_PANELS) if any(data[s].get(p) for s in stages)]
    fig, axes = plt.subplots(len(rows), len(stages), figsize=(4.5 * len(stages), 3.0 * len(rows)),
                             squeeze=False)
    for col, stage in enumerate(stages):
        for row, panel in enumerate(rows):
            ax = axes[row][col]
            series = data[stage].get(panel) or {}
            if not series:
                ax.axis("off")
                continue
            for key, s in series.items():
                line, = ax.plot(s["step"], s["value"], marker="o" if panel != "training" else None,
                                label=key)
                if "sem" in s:
                    low = [v - e for v, e in zip(s["value"], s["sem"])]
                    high = [v + e for v, e in zip(s["value"], s["sem"])]
                else:
                    low, high = s.get("low"), s.get("high")
                if low is not None:
                    ax.fill_between(s["step"], low, high, color=line.get_color(), alpha=0.25)
            ax.set_title(f"{stage}: {panel}")
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows


def plot_curves(workdir: str, stages: list[str], path: str) -> dict[str, Any]:
    """WORKDIR/<stage> curves (see the module docstring) saved to `path`; returns the
    plotted data (`curve_data`)."""
    data = curve_data(workdir, stages)
    plot_panels(data, path)
    return data
