"""SFT: demonstrations from a built-in task or prompt/completion files."""

from __future__ import annotations

from jalign.algorithms.common import (AlgorithmSetup, check_vocab, load_start_params,
                                      load_tokenizer, report_skips, report_truncation,
                                      summarize_run, task_evaluator)
from jalign.data import (SkipReport, TruncationReport, load_records, make_sft_dataset,
                         tokenizable_sft_records)
from jalign.models.config import ModelConfig
from jalign.steps.common import decoder_logprob_fn
from jalign.steps.sft import make_sft_step
from jalign.tasks import get_task


def sft_records(config, tokenizer):
    """(task, records, skip report, truncation report): demonstrations from a built-in
    task or files.

    Records that do not tokenise with the configured lengths (e.g. a prompt that
    fills max_length, a chat template that raises on the row) are raised or, under
    `on_bad_row="skip"`, counted in the same report as the file's bad rows, once;
    what the lengths cut from the others is counted and printed.
    """
    data = config.data
    task, report = None, SkipReport()
    if data.source == "task":
        task = get_task(data.task)
        records = task.demonstrations(data.num_train_examples, seed=config.seed,
                                      quality=data.demo_quality)
    else:
        paths = [p for p in data.path.split(",") if p]
        if not paths:
            raise ValueError(f"config.data.path must name the {data.source} file(s) to read")
        records, report = load_records(paths, required_fields=("prompt", "completion"),
                                       on_bad_row=data.on_bad_row)
    truncated = TruncationReport()
    records = tokenizable_sft_records(
        records, tokenizer, max_length=data.max_length,
        max_prompt_length=data.max_prompt_length, truncation=data.truncation,
        on_bad_row=data.on_bad_row, skip_report=report, truncation_report=truncated)
    report_skips(report)
    report_truncation(truncated, data)
    return task, records, report, truncated


def spec(config) -> None:
    """SFT reads no algorithm section."""
    del config


def sft_dataset_fn(config, records, tokenizer):
    """`dataset(process_index, process_count)`: this process's share of the SFT batches."""
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
            # Every process pads step k's batch to the same width (jalign.data.padding).
            pad_to_multiple_of=data.pad_to_multiple_of,
            bucket_boundaries=data.bucket_boundaries)

    return dataset


def setup(config, model_cfg: ModelConfig, spec, workdir: str) -> AlgorithmSetup:
    del spec, workdir
    tokenizer = load_tokenizer(config)
    check_vocab(model_cfg, tokenizer)
    task, records, report, truncated = sft_records(config, tokenizer)
    dataset = sft_dataset_fn(config, records, tokenizer)
    return AlgorithmSetup(dataset=dataset,
                          load_params=load_start_params(config),
                          evaluate=task_evaluator(config, model_cfg, tokenizer, task),
                          summarize=summarize_run("sft", skip_report=report,
                                                  truncation_report=truncated))


def make_step(config, model_cfg, spec, optimizer):
    del spec
    logprob_fn = decoder_logprob_fn(model_cfg, logprob_impl=config.train.logprob_impl,
                                    with_stats=True)
    return make_sft_step(logprob_fn, optimizer,
                         grad_accum_steps=config.optimizer.grad_accum_steps)
