"""What each algorithm brings to the one training loop: data, step, evaluation.

An `AlgorithmSetup` is built from the config before training; the loop in
jalign.train is the same for every algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jalign.models.config import ModelConfig


@dataclasses.dataclass
class AlgorithmSetup:
    tokenizer: Any
    dataset: Callable[[int, int], Any]          # (process_index, process_count) -> grain IterDataset
    init_params: Any = None                      # starting params (None = fresh init)
    evaluate: Callable[..., dict] | None = None  # (params, start_params) -> metrics
    summarize: Callable[..., dict] | None = None


@dataclasses.dataclass(frozen=True)
class Algorithm:
    setup: Callable[..., AlgorithmSetup]
    make_step: Callable[..., Callable]


def load_tokenizer(config):
    from jalign.tokenizer import Tokenizer, builtin_tokenizer
    return Tokenizer.from_file(config.data.tokenizer) if config.data.tokenizer else builtin_tokenizer()


def _check_vocab(model_cfg: ModelConfig, tokenizer) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"config.model.vocab_size ({model_cfg.vocab_size}) is smaller than the "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size})")


def sft_records(config, tokenizer):
    """Prompt/completion records from a built-in task or from JSONL/Parquet files."""
    data = config.data
    if data.source == "task":
        from jalign.tasks import get_task
        task = get_task(data.task)
        return task, task.demonstrations(data.num_train_examples, seed=config.seed,
                                         quality=data.demo_quality)
    from jalign.data import load_records
    paths = [p for p in data.path.split(",") if p]
    if not paths:
        raise ValueError(f"config.data.path must name the {data.source} file(s) to read")
    records, report = load_records(paths, required_fields=("prompt", "completion"),
                                   on_bad_row=data.on_bad_row)
    if report.total:
        print(report.summary())
    return None, records


def task_evaluator(config, model_cfg: ModelConfig, tokenizer, task):
    """Held-out gold reward, KL to the starting policy and completion length on a task."""
    if task is None:
        return None
    from jalign.evaluate import evaluate_policy
    prompts = task.prompts(config.eval.num_prompts, seed=config.seed + 1, split="eval")

    def evaluate(params, start_params):
        return evaluate_policy(params, model_cfg, tokenizer, task, prompts,
                               max_new_tokens=config.eval.max_new_tokens, seed=config.seed,
                               ref_params=start_params,
                               batch_size=config.eval.batch_size,
                               temperature=config.eval.temperature)
    return evaluate


def summarize_run(name: str):
    def summarize(evals, final_metrics):
        out = {"algo": name, "final_metrics": final_metrics, "evals": evals}
        if evals:
            out["initial"], out["final"] = evals[0], evals[-1]
            before = evals[0].get("gold_reward/greedy")
            after = evals[-1].get("gold_reward/greedy")
            if before is not None:
                print(f"[{name}] held-out gold reward (greedy): before {before:.3f} -> "
                      f"after {after:.3f}")
        return out
    return summarize


def _sft_setup(config, model_cfg: ModelConfig, workdir: str) -> AlgorithmSetup:
    from jalign.data import make_sft_dataset
    tokenizer = load_tokenizer(config)
    _check_vocab(model_cfg, tokenizer)
    task, records = sft_records(config, tokenizer)
    data = config.data

    def dataset(process_index, process_count):
        if data.batch_size % process_count:
            raise ValueError(f"config.data.batch_size ({data.batch_size}) must be divisible by "
                             f"the number of processes ({process_count})")
        return make_sft_dataset(
            records, tokenizer, batch_size=data.batch_size // process_count,
            max_length=data.max_length, seed=config.seed, packing=data.packing,
            max_prompt_length=data.max_prompt_length, truncation=data.truncation,
            shard_index=process_index, shard_count=process_count, on_bad_row=data.on_bad_row)

    return AlgorithmSetup(tokenizer=tokenizer, dataset=dataset,
                          evaluate=task_evaluator(config, model_cfg, tokenizer, task),
                          summarize=summarize_run("sft"))


def _sft_step(config, model_cfg, optimizer, schedule, setup):
    from jalign.steps.sft import make_sft_step
    return make_sft_step(model_cfg, optimizer, schedule=schedule,
                         grad_accum_steps=config.optimizer.grad_accum_steps,
                         logprob_impl=config.train.logprob_impl)


_ALGORITHMS = {"sft": Algorithm(setup=_sft_setup, make_step=_sft_step)}


def get_algorithm(name: str) -> Algorithm:
    if name not in _ALGORITHMS:
        raise ValueError(f"config.algo {name!r} is not known; valid: {sorted(_ALGORITHMS)}")
    return _ALGORITHMS[name]
