"""Data: record loading and validation, tokenisation, grain batch pipelines."""

from jalign.data.pipeline import (
    default_bucket_boundaries,
    epoch_dataset,
    make_sft_dataset,
    pack_and_batch,
    pad_batch,
    tokenizable_sft_records,
)
from jalign.data.preference import (
    extract_prompt,
    load_preference_records,
    preference_records_from_dicts,
    tokenizable_preference_records,
    tokenize_preference_pair,
    validate_preference_record,
)
from jalign.data.preference_batches import make_preference_dataset, make_unpaired_dataset
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
    "extract_prompt",
    "load_preference_records",
    "load_records",
    "make_preference_dataset",
    "make_sft_dataset",
    "make_unpaired_dataset",
    "pack_and_batch",
    "pad_batch",
    "preference_records_from_dicts",
    "records_from_dicts",
    "render_conversation",
    "tokenizable_preference_records",
    "tokenizable_sft_records",
    "tokenize_preference_pair",
    "tokenize_prompt_completion",
    "validate_preference_record",
    "validate_record",
]
