"""Data: record loading and validation, tokenisation, grain batch pipelines."""

from jalign.data.pipeline import (
    default_bucket_boundaries,
    epoch_dataset,
    make_sft_dataset,
    pack_and_batch,
    pad_batch,
)
from jalign.data.sft import (
    PromptTooLongError,
    TokenizerLike,
    render_conversation,
    tokenize_prompt_completion,
)
from jalign.data.sources import (
    DataError,
    SkipReport,
    load_records,
    records_from_dicts,
    validate_record,
)

__all__ = [
    "DataError",
    "PromptTooLongError",
    "SkipReport",
    "TokenizerLike",
    "default_bucket_boundaries",
    "epoch_dataset",
    "load_records",
    "make_sft_dataset",
    "pack_and_batch",
    "pad_batch",
    "records_from_dicts",
    "render_conversation",
    "tokenize_prompt_completion",
    "validate_record",
]
