"""SFT: demonstrations from a built-in task or prompt/completion files."""

from __future__ import annotations

from jalign.algorithms.common import (AlgorithmSetup, check_vocab, load_start_params,
                                      load_tokenizer, summarize_run, task_evaluator)
from jalign.models.config import ModelConfig


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


def setup(config, model_cfg: ModelConfig, workdir: str) -> AlgorithmSetup:
    from jalign.data import make_sft_dataset
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
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
            shard_index=process_index, shard_count=process_count, on_bad_row=data.on_bad_row,
            # Several processes must agree on the padded width: one bucket then.
            bucket_boundaries=(data.max_length,) if process_count > 1 else None)

    return AlgorithmSetup(tokenizer=tokenizer, dataset=dataset,
                          load_params=load_start_params(config),
                          evaluate=task_evaluator(config, model_cfg, tokenizer, task),
                          summarize=summarize_run("sft"))


def make_step(config, model_cfg, optimizer, schedule, setup):
    from jalign.steps.sft import make_sft_step
    return make_sft_step(model_cfg, optimizer, schedule=schedule,
                         grad_accum_steps=config.optimizer.grad_accum_steps,
                         logprob_impl=config.train.logprob_impl)
