"""Data: record loading and validation, tokenisation, grain batch pipelines."""

from jalign.data.padding import RowWidths, default_bucket_boundaries, row_widths
from jalign.data.pipeline import (
    epoch_dataset,
    make_sft_dataset,
    pack_and_batch,
    pad_batch,
    tokenizable_sft_records,
)
from jalign.data.preference import (
    extract_prompt,
    fit_preference_pair,
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
    fit_prompt_completion,
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
from jalign.data.truncation import TRUNCATION_KINDS, Truncation, TruncationReport

__all__ = [
    "DataError",
    "PromptTooLongError",
    "RowWidths",
    "SkipReport",
    "TRUNCATION_KINDS",
    "Truncation",
    "TruncationReport",
    "TokenizerLike",
    "default_bucket_boundaries",
    "epoch_dataset",
    "extract_prompt",
    "fit_preference_pair",
    "fit_prompt_completion",
    "load_preference_records",
    "load_records",
    "make_preference_dataset",
    "make_sft_dataset",
    "make_unpaired_dataset",
    "pack_and_batch",
    "pad_batch",
    "preference_records_from_dicts",
    "records_from_dicts",
    "row_widths",
    "render_conversation",
    "tokenizable_preference_records",
    "tokenizable_sft_records",
    "tokenize_preference_pair",
    "tokenize_prompt_completion",
    "validate_preference_record",
    "validate_record",
]
