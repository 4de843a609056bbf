"""Metrics to WORKDIR/metrics.jsonl and TensorBoard, and a progress bar (process 0 only)."""

from __future__ import annotations

import json
import os
from typing import Any

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends one JSON object per logged step (with "step") to metrics.jsonl."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.eval_path = os.path.join(workdir, "evals.jsonl")
        self.last_metrics: dict[str, float] = {}
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # deferred: heavy, only the main process logs
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """After a resume from `step`, drops records of later steps so the files read as one run."""
        if not self.enabled:
            return
        for path in (self.path, self.eval_path):
            if os.path.exists(path):
                kept = [line for line in open(path) if _step_of(line) is not None
                        and _step_of(line) <= step]
                with open(path, "w") as f:
                    f.writelines(kept)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self.last_metrics = dict(metrics)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)

    def write_eval(self, result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(result) + "\n")
        for key, value in result.items():
            if key != "step" and isinstance(value, (int, float)):
                # TensorBoard shows eval_X as eval/X, as transformers does for TRL runs.
                name = key[len("eval_"):] if key.startswith("eval_") else key
                self._tb.add_scalar(f"eval/{name}", value, result["step"])

    def read_evals(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.eval_path):
            return []
        return [json.loads(line) for line in open(self.eval_path) if _step_of(line) is not None]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """tqdm bar over steps showing loss and tokens/s, with tqdm's ETA."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        self._bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                         dynamic_ncols=True)
        self._rate = None

    def update(self, step: int, loss: float | None) -> None:
        self._bar.n = step
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if self._rate is not None:
            postfix["tok/s"] = f"{self._rate:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def set_rate(self, tokens_per_second: float) -> None:
        self._rate = tokens_per_second

    def write(self, message: str) -> None:
        self._bar.write(message) if not self._bar.disable else None

    def close(self) -> None:
        self._bar.close()


def _step_of(line: str):
    """The step of a metrics line, or None for a blank or partial one (a run killed
    mid-write leaves a cut-off last line)."""
    try:
        return json.loads(line)["step"] if line.strip() else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
