"""grain pipelines that turn validated records into fixed-shape numpy batches.

    records -> keep those that tokenise (checked once, up front)
            -> MapDataset.source -> shard (this process's slice)
            -> shuffle(seed) -> repeat (reshuffled each epoch)
            -> map(tokenize) -> to_iter_dataset
            -> batch, padded to the longest row (packing=False)
             | first-fit pack rows, then batch  (packing=True)

Every batch is a dict of int32 arrays, all [B, T]:

    tokens       pad_id at padding
    loss_mask    1 where the token is a completion target, predicted from the
                 earlier tokens of the same segment; 0 at every segment start
    segment_ids  1..k for the sequences packed in a row, 0 for padding
    positions    0, 1, ... restarting at each segment; 0 at padding

T is, in padded mode, the batch's longest sequence rounded up to a multiple
(default 64) or, with explicit buckets, the smallest bucket boundary that fits
it (`jalign.data.padding`: a jitted step compiles once per distinct T, at most
ceil(max_length / 64) of them); with packing it is max_length. The last batch
of a finite run is filled up to B with all-padding rows (segment_ids 0,
loss_mask 0).

Bad rows: every record is tokenised once when the dataset is built, before
sharding. One that fails (a prompt that fills max_length, a chat template that
raises, ...) raises a DataError naming its origin, or under on_bad_row="skip"
is counted by reason in the SkipReport and left out, so the dataset holds
only records that tokenise and the counts are known before the first batch.
The same pass counts what truncation cut from the kept rows (a
`TruncationReport`, see `jalign.data.truncation`).

Checkpointing: `it = iter(ds)`; `it.get_state()` is a small dict and
`iter(ds).set_state(state)` on an identically built dataset continues with
exactly the batches the first iterator would have produced next.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence

import grain
import numpy as np

from jalign.data.padding import (DEFAULT_PAD_TO_MULTIPLE_OF, LocalWidth, PadBatch, Positioned,
                                 RowWidths, SharedWidth, default_bucket_boundaries,
                                 resolve_bucket_boundaries, row_widths, with_position)
from jalign.data.sft import TRUNCATION_MODES, TokenizerLike, fit_prompt_completion
from jalign.data.sources import ON_BAD_ROW, ORIGIN_KEY, DataError, SkipReport
from jalign.data.truncation import TruncationReport

__all__ = ["DEFAULT_PAD_TO_MULTIPLE_OF", "RowWidths", "default_bucket_boundaries",
           "epoch_dataset", "make_sft_dataset", "pack_and_batch", "pad_batch",
           "padded_batches", "resolve_bucket_boundaries", "row_widths",
           "tokenizable_indices", "tokenizable_sft_records", "tokenized_examples"]

# Tokenising is light: two reader threads keep up on small machines without
# oversubscribing the cores the train step needs.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def _with_index(index: int, record: Mapping) -> tuple[int, Mapping]:
    return index, record


def epoch_dataset(records: Sequence[Mapping], *, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, shard_index: int = 0,
                  shard_count: int = 1,
                  indices: Sequence[int] | None = None) -> grain.MapDataset:
    """This process's records, shuffled per epoch and repeated.

    Elements are `(index, record)` with `index` the position in `records` (used
    to name records that carry no "_origin"). Shard i of n takes records
    i, i + n, i + 2n, ...: shards are disjoint and together cover `records`
    (their sizes differ by at most one, so with a finite `num_epochs` shards
    can yield different numbers of batches: give every process the same
    number of steps, e.g. by repeating forever and counting steps).

    Args:
        records: the full record list (identical on every process).
        seed: shuffle seed; each epoch is reshuffled with a seed derived from it.
        shuffle: shuffle within the shard.
        num_epochs: number of passes; None repeats forever.
        shard_index: this process's shard (e.g. jax.process_index()).
        shard_count: number of shards (e.g. jax.process_count()).
        indices: positions in `records` to use, in order (default: all); they
            are shuffled and sharded as if they were the whole list.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got "
                         f"{shard_index} and {shard_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if indices is None:
        ds = grain.MapDataset.source(records).map_with_index(_with_index)
    else:
        ds = grain.MapDataset.source([(i, records[i]) for i in indices])
    ds = ds.slice(slice(shard_index, None, shard_count))
    if len(ds) == 0:
        n = len(records) if indices is None else len(indices)
        raise DataError(f"shard {shard_index} of {shard_count} is empty: only "
                        f"{n} records")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


def tokenizable_indices(records: Sequence[Mapping], check: Callable, *,
                        on_bad_row: str, skip_report: SkipReport | None,
                        truncation_report: TruncationReport | None = None) -> list[int]:
    """Positions of the records that `check((index, record))` accepts.

    Runs once over all records, in order. A record `check` rejects with a
    DataError raises it (on_bad_row="raise") or is counted in `skip_report`
    and left out (on_bad_row="skip"; without a report, the count is logged
    as a warning). With `truncation_report`, what `check` returns for a kept
    record (its `Truncation`, or one per sequence of the row) is counted there.

    Raises:
        DataError: the first bad record under "raise"; or no record is left.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    report = SkipReport() if skip_report is None else skip_report
    before = report.total
    kept = []
    for index, record in enumerate(records):
        try:
            cuts = check((index, record))
        except DataError as e:
            if on_bad_row == "raise":
                raise
            report.add(e)
            continue
        if truncation_report is not None:
            truncation_report.add(cuts)
        kept.append(index)
    if not kept:
        raise DataError(f"none of the {len(records)} records could be tokenised; "
                        f"{report.summary()}")
    if skip_report is None and report.total > before:
        logging.getLogger(__name__).warning("tokenisation %s", report.summary())
    return kept


def tokenized_examples(records: Sequence[Mapping], tokenize, *, seed: int, shuffle: bool,
                       num_epochs: int | None, shard_index: int, shard_count: int,
                       on_bad_row: str, skip_report: SkipReport | None,
                       check: Callable | None = None,
                       read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """This process's records that tokenise, shuffled per epoch, mapped by `tokenize`.

    `tokenize((index, record))` returns an example or raises a DataError naming
    the record. `check` (default `tokenize`) decides up front, over all
    records, which are kept (see `tokenizable_indices`); `tokenize` then runs
    lazily in grain's reader threads on kept records only.
    """
    kept = tokenizable_indices(records, check or tokenize, on_bad_row=on_bad_row,
                               skip_report=skip_report)
    return (
        epoch_dataset(records, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                      shard_index=shard_index, shard_count=shard_count,
                      indices=None if len(kept) == len(records) else kept)
        .map(tokenize)
        .to_iter_dataset(read_options or DEFAULT_READ_OPTIONS)
    )


def padded_batches(records: Sequence[Mapping], tokenize, stack_fn, *,
                   length_fn: Callable[[Mapping], int], widths: RowWidths,
                   batch_size: int, seed: int, shuffle: bool, num_epochs: int | None,
                   shard_index: int, shard_count: int, on_bad_row: str,
                   skip_report: SkipReport | None, check: Callable | None = None,
                   read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
    """`tokenized_examples` in batches of `batch_size`, padded to a `widths` width.

    `stack_fn(examples, width)` builds a batch of rows `width` wide;
    `length_fn(example)` is the length its rows need. With one shard, a batch
    is as wide as its longest example needs; with several, batch k of every
    shard is as wide as the longest example of all shards' batch k (see
    `_SharedWidth`), so the processes of a multi-process run stack batches of
    one shape into the global batch.
    """
    kept = tokenizable_indices(records, check or tokenize, on_bad_row=on_bad_row,
                               skip_report=skip_report)
    stream_args = dict(seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                       shard_count=shard_count,
                       indices=None if len(kept) == len(records) else kept)
    stream = epoch_dataset(records, shard_index=shard_index, **stream_args)
    if shard_count == 1:
        width_fn = LocalWidth(widths, length_fn)
        examples = stream.map(tokenize)
    else:
        streams = [epoch_dataset(records, shard_index=s, **stream_args)
                   for s in range(shard_count)]
        width_fn = SharedWidth(widths, length_fn, tokenize, records, streams, batch_size)
        examples = stream.map_with_index(with_position).map(Positioned(tokenize))
    return examples.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS).batch(
        batch_size, batch_fn=PadBatch(stack_fn, width_fn))


@dataclasses.dataclass
class _TokenizeSFT:
    """Picklable map function: (index, record) -> example; DataError names the record."""

    tokenizer: TokenizerLike
    max_length: int
    max_prompt_length: int | None
    truncation: str
    add_bos: bool

    def __call__(self, item):
        return self._fit(item)[0]

    def check(self, item):
        """The record's `Truncation`; raises the DataError `__call__` would raise."""
        return self._fit(item)[1]

    def _fit(self, item):
        index, record = item
        try:
            return fit_prompt_completion(
                record["prompt"], record["completion"], self.tokenizer,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
                truncation=self.truncation, add_bos=self.add_bos)
        except DataError as e:
            origin = record.get(ORIGIN_KEY, f"record {index}")
            raise DataError(f"{origin}: {e}", reason=e.reason) from None


def tokenizable_sft_records(
    records: Sequence[Mapping], tokenizer: TokenizerLike, *, max_length: int,
    max_prompt_length: int | None = None, truncation: str = "keep_end",
    add_bos: bool = True, on_bad_row: str = "raise",
    skip_report: SkipReport | None = None,
    truncation_report: TruncationReport | None = None,
) -> list[Mapping]:
    """The records `make_sft_dataset` with these arguments would keep.

    For a training run to check (and count) its records once at start-up, in
    the report that counted the file's bad rows; building datasets from the
    returned list then skips nothing. What truncation cuts from the kept
    records is counted in `truncation_report`. Other arguments as in
    `make_sft_dataset`.
    """
    tokenize = _TokenizeSFT(tokenizer, max_length, max_prompt_length, truncation,
                            add_bos)
    kept = tokenizable_indices(records, tokenize.check, on_bad_row=on_bad_row,
                               skip_report=skip_report,
                               truncation_report=truncation_report)
    return [records[i] for i in kept]


def _row_layout(length: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """segment_ids and positions of a row holding one sequence of `length`."""
    segment_ids = np.zeros(width, np.int32)
    segment_ids[:length] = 1
    positions = np.zeros(width, np.int32)
    positions[:length] = np.arange(length, dtype=np.int32)
    return segment_ids, positions


def pad_batch(examples: Sequence[Mapping[str, np.ndarray]], width: int, *,
              batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """Stacks one example per row, padded to `width`.

    `examples` hold 1-D `tokens` and `loss_mask`; fewer than `batch_size`
    examples (the end of a finite run) are topped up with all-padding rows.
    """
    batch = {
        "tokens": np.full((batch_size, width), pad_id, np.int32),
        "loss_mask": np.zeros((batch_size, width), np.int32),
        "segment_ids": np.zeros((batch_size, width), np.int32),
        "positions": np.zeros((batch_size, width), np.int32),
    }
    for row, ex in enumerate(examples):
        n = len(ex["tokens"])
        batch["tokens"][row, :n] = ex["tokens"]
        batch["loss_mask"][row, :n] = ex["loss_mask"]
        batch["segment_ids"][row], batch["positions"][row] = _row_layout(n, width)
    return batch


def _sequence_length(example: Mapping) -> int:
    return len(example["tokens"])


def _stack_packed_rows(rows: Sequence[Mapping[str, np.ndarray]], *,
                       batch_size: int, width: int,
                       pad_id: int) -> dict[str, np.ndarray]:
    """Stacks packed rows; tops up a final short batch with padding rows."""
    batch = {k: np.stack([r[k] for r in rows]).astype(np.int32)
             for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    missing = batch_size - len(rows)
    if missing:
        fill = {"tokens": pad_id, "loss_mask": 0, "segment_ids": 0, "positions": 0}
        batch = {k: np.concatenate([v, np.full((missing, width), fill[k], np.int32)])
                 for k, v in batch.items()}
    return batch


def _from_grain_packing(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # grain names the packing outputs "<feature>_segment_ids"/"_positions".
    return {"tokens": row["tokens"], "loss_mask": row["loss_mask"],
            "segment_ids": row["tokens_segment_ids"],
            "positions": row["tokens_positions"]}


def _row_is_not_empty(row: Mapping[str, np.ndarray]) -> bool:
    return bool(row["segment_ids"].any())


def pack_and_batch(examples: grain.IterDataset, *, batch_size: int,
                   max_length: int, pad_id: int, seed: int,
                   shuffle: bool = True) -> grain.IterDataset:
    """First-fit packs `{tokens, loss_mask}` examples into rows of max_length.

    Uses grain's `FirstFitPackIterDataset` with `batch_size` bins: examples
    fill the first bin with room, in arrival order; when one fits nowhere the
    bins are emitted (shuffled if `shuffle`) and packing restarts with it.
    With num_epochs > 1, a row can hold examples of two adjacent epochs.
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={"tokens": max_length, "loss_mask": max_length},
        num_packing_bins=batch_size,
        seed=seed,
        shuffle_bins=shuffle,
        padding_struct={"tokens": pad_id, "loss_mask": 0},
    )
    rows = packed.map(_from_grain_packing).filter(_row_is_not_empty)
    return rows.batch(batch_size, batch_fn=functools.partial(
        _stack_packed_rows, batch_size=batch_size, width=max_length,
        pad_id=pad_id))


def make_sft_dataset(
    records: Sequence[Mapping],
    tokenizer: TokenizerLike,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    packing: bool = False,
    bucket_boundaries: Sequence[int] | None = None,
    pad_to_multiple_of: int = DEFAULT_PAD_TO_MULTIPLE_OF,
    max_prompt_length: int | None = None,
    truncation: str = "keep_end",
    add_bos: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    on_bad_row: str = "raise",
    skip_report: SkipReport | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """SFT batches (see the module docstring for their layout).

    Args:
        records: dicts with "prompt" and "completion" (strings or message
            lists), e.g. from `load_records`; an "_origin" key names the record
            in errors.
        tokenizer: see `TokenizerLike`.
        batch_size: rows per batch (per process).
        max_length: longest sequence; the row width in packing mode and the
            last bucket boundary in padded mode.
        seed: shuffle (and packing-bin shuffle) seed; output is deterministic
            given the seed.
        shuffle: shuffle records each epoch (and packed rows within a group).
        num_epochs: passes over this shard; None repeats forever.
        packing: pack several examples per row (first fit) instead of one.
        bucket_boundaries: padded-mode row widths (max_length is always
            appended), e.g. `default_bucket_boundaries(max_length)`; None pads
            to the batch's longest sequence rounded up to `pad_to_multiple_of`
            (see `jalign.data.padding`). Unused when packing.
        pad_to_multiple_of: the rounding of padded widths without buckets.
        max_prompt_length, truncation, add_bos: see `tokenize_prompt_completion`.
        shard_index, shard_count: this process's disjoint shard of records.
        on_bad_row: what to do with a record that does not tokenise (its
            prompt leaves no room for the completion, the chat template fails):
            "raise" a DataError naming its origin, or "skip" it.
        skip_report: skipped records are counted in it by reason, once, when
            the dataset is built (over all records, not only this shard);
            without one, the count is logged as a warning.
        read_options: grain ReadOptions for the tokenising reader threads.

    Returns:
        A grain.IterDataset of dicts of int32 [batch_size, T] arrays.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    tokenize = _TokenizeSFT(tokenizer, max_length, max_prompt_length, truncation,
                            add_bos)
    stream = dict(seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                  shard_index=shard_index, shard_count=shard_count,
                  on_bad_row=on_bad_row, skip_report=skip_report,
                  check=tokenize.check, read_options=read_options)
    if packing:
        examples = tokenized_examples(records, tokenize, **stream)
        return pack_and_batch(examples, batch_size=batch_size,
                              max_length=max_length, pad_id=tokenizer.pad_id,
                              seed=seed, shuffle=shuffle)
    widths = row_widths(max_length, pad_to_multiple_of=pad_to_multiple_of,
                        bucket_boundaries=bucket_boundaries)
    return padded_batches(
        records, tokenize, functools.partial(pad_batch, batch_size=batch_size,
                                             pad_id=tokenizer.pad_id),
        length_fn=_sequence_length, widths=widths, batch_size=batch_size, **stream)
