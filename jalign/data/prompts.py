"""Prompt datasets for online RL (GRPO, RLOO, PPO, online DPO).

A record has "prompt" (a string, or a list of {"role", "content"} messages rendered
with the tokenizer's chat template and its generation prompt) and any other
columns ("answer", "tests", "metadata", ...), which travel unchanged with the
prompt to the reward functions. Records come from JSONL / Parquet files
(`load_records(paths, required_fields=("prompt",))`) or from a built-in task.

`prepare_prompt_records` renders and tokenises every prompt once at start-up:
a prompt longer than `max_prompt_length` tokens (BOS included) is raised naming
its file and line, or counted as a skip: prompts are never cut (a training run
passes data.max_prompt_length, or data.max_length when that is 0). The dataset itself yields only the
records' positions, `{"prompt_index": int32 [B]}`, shuffled per epoch and split
across processes through grain, so its iterator is checkpointable (a resumed
run continues with the same prompts) whatever the columns hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jalign.data.pipeline import epoch_dataset, tokenizable_indices
from jalign.data.sft import PromptTooLongError, TokenizerLike, _is_conversation
from jalign.data.sources import ORIGIN_KEY, DataError, SkipReport
from jalign.data.truncation import Truncation, TruncationReport

# Keys `prepare_prompt_records` adds; the reward functions never see them.
PROMPT_TEXT_KEY = "_prompt_text"
PROMPT_IDS_KEY = "_prompt_ids"


def render_prompt(prompt: str | Sequence[Mapping[str, str]], tokenizer: TokenizerLike) -> str:
    """The prompt as the policy reads it: text as is, messages through the chat template
    with its generation prompt (e.g. the assistant header)."""
    if not _is_conversation(prompt):
        return prompt
    try:
        return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
    except ValueError as e:
        raise DataError(str(e), reason="chat_template") from None


def prompt_token_ids(text: str, tokenizer: TokenizerLike) -> list[int]:
    """[BOS] + tokens of `text`; a BOS the chat template wrote is not doubled."""
    ids = list(tokenizer.encode(text))
    bos = tokenizer.bos_id
    if bos is None:
        return ids
    return [bos] + (ids[1:] if ids[:1] == [bos] else ids)


class _PreparePrompt:
    def __init__(self, tokenizer: TokenizerLike, max_prompt_length: int, limit_name: str):
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length
        self.limit_name = limit_name

    def check(self, item) -> Truncation:
        """The prompt's lengths (never cut); raises the DataError `__call__` would raise."""
        n = len(self(item)[PROMPT_IDS_KEY])
        return Truncation(False, False, False, prompt_tokens=n, sequence_tokens=n)

    def __call__(self, item) -> dict:
        index, record = item
        origin = record.get(ORIGIN_KEY, f"record {index}")
        try:
            text = render_prompt(record["prompt"], self.tokenizer)
        except DataError as e:
            raise DataError(f"{origin}: {e}", reason=e.reason) from None
        ids = prompt_token_ids(text, self.tokenizer)
        if len(ids) > self.max_prompt_length:
            raise PromptTooLongError(
                f"{origin}: prompt is {len(ids)} tokens (with BOS), more than "
                f"{self.limit_name}={self.max_prompt_length}; raise it or skip "
                "such rows (config.data.on_bad_row='skip')")
        return {**record, PROMPT_TEXT_KEY: text, PROMPT_IDS_KEY: tuple(ids)}


def prepare_prompt_records(records: Sequence[Mapping], tokenizer: TokenizerLike, *,
                           max_prompt_length: int, on_bad_row: str = "raise",
                           skip_report: SkipReport | None = None,
                           truncation_report: TruncationReport | None = None,
                           limit_name: str = "config.data.max_prompt_length") -> list[dict]:
    """Every usable record with its rendered prompt text and token ids added.

    Raises (on_bad_row="raise") or counts in `skip_report` (on_bad_row="skip") the
    records whose chat template fails or whose prompt is too long. Kept prompts are
    counted in `truncation_report` (rows and the longest prompt; none is cut).
    `limit_name` is the setting errors tell the user to raise.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    prepare = _PreparePrompt(tokenizer, max_prompt_length, limit_name)
    kept = tokenizable_indices(records, prepare.check, on_bad_row=on_bad_row,
                               skip_report=skip_report, truncation_report=truncation_report)
    return [prepare((i, records[i])) for i in kept]


def _index_only(item) -> np.int32:
    return np.int32(item[0])


def make_prompt_dataset(records: Sequence[Mapping], *, batch_size: int, seed: int,
                        shuffle: bool = True, num_epochs: int | None = None,
                        shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """Batches `{"prompt_index": int32 [batch_size]}` of positions in `records`: this
    process's shard, shuffled per epoch, repeated (`num_epochs=None`)."""
    ds = epoch_dataset(records, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                       shard_index=shard_index, shard_count=shard_count)
    return (ds.map(_index_only).batch(batch_size, drop_remainder=num_epochs is None)
            .map(lambda ids: {"prompt_index": np.asarray(ids, np.int32)}).to_iter_dataset())


def reward_columns(records: Sequence[Mapping]) -> dict[str, list[Any]]:
    """The columns a batch of records passes to reward functions, as keyword lists:
    every key but "prompt" and jalign's private ones (leading underscore). A column a
    record lacks is None there."""
    names = [k for r in records for k in r if k != "prompt" and not k.startswith("_")]
    names = list(dict.fromkeys(names))
    return {name: [r.get(name) for r in records] for name in names}
