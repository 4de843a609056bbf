"""Built-in tasks with programmatic gold rewards (the embedded default).

    task = get_task("sort")
    prompts = task.prompts(64, seed=0, split="eval")
    rewards = task.gold_reward(prompts, completions)  # float32 [64] in [0, 1]
"""

from __future__ import annotations

import dataclasses

from jalign.tasks.add import AddTask
from jalign.tasks.base import SPLITS, Task
from jalign.tasks.calc import CalcTask
from jalign.tasks.guess import GuessEnvironment, GuessTask
from jalign.tasks.sentiment import SentimentTask
from jalign.tasks.sort import SortTask

_REGISTRY: dict[str, type[Task]] = {
    task.name: task for task in (SortTask, AddTask, SentimentTask, CalcTask, GuessTask)
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


def get_task(name: str, **options) -> Task:
    """The built-in task ``name`` (one of ``TASKS``) built with ``options``.

    Raises:
      ValueError: unknown name or option (the message lists the valid ones),
        or an option out of range.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}")
    cls = _REGISTRY[name]
    valid = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for task {name!r}; "
            f"valid options: {', '.join(valid) or 'none'}")
    return cls(**options)


__all__ = ["AddTask", "CalcTask", "GuessEnvironment", "GuessTask", "SPLITS", "SentimentTask",
           "SortTask", "TASKS", "Task", "get_task"]
