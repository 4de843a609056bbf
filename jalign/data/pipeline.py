"""grain pipelines that turn validated records into fixed-shape numpy batches.

    records -> keep those that tokenise (checked once, up front)
            -> MapDataset.source -> shard (this process's slice)
            -> shuffle(seed) -> repeat (reshuffled each epoch)
            -> map(tokenize) -> to_iter_dataset
            -> batch with bucketed padding      (packing=False)
             | first-fit pack rows, then batch  (packing=True)

Every batch is a dict of int32 arrays, all [B, T]:

    tokens       pad_id at padding
    loss_mask    1 where the token is a completion target, predicted from the
                 earlier tokens of the same segment; 0 at every segment start
    segment_ids  1..k for the sequences packed in a row, 0 for padding
    positions    0, 1, ... restarting at each segment; 0 at padding

T is one of the bucket boundaries (padded mode) or max_length (packing), so a
jitted step compiles for few shapes. The last batch of a finite run is filled
up to B with all-padding rows (segment_ids 0, loss_mask 0).

Bad rows: every record is tokenised once when the dataset is built, before
sharding. One that fails (a prompt that fills max_length, a chat template that
raises, ...) raises a DataError naming its origin, or under on_bad_row="skip"
is counted by reason in the SkipReport and left out, so the dataset holds
only records that tokenise and the counts are known before the first batch.

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

from jalign.data.sft import TRUNCATION_MODES, TokenizerLike, tokenize_prompt_completion
from jalign.data.sources import ON_BAD_ROW, ORIGIN_KEY, DataError, SkipReport

# Tokenising is light: two reader threads keep up on small machines without
# oversubscribing the cores the train step needs.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def default_bucket_boundaries(max_length: int, *, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_length`, then `max_length`."""
    boundaries = []
    b = smallest
    while b < max_length:
        boundaries.append(b)
        b *= 2
    return tuple(boundaries) + (max_length,)


def resolve_bucket_boundaries(bucket_boundaries: Sequence[int] | None,
                              max_length: int) -> tuple[int, ...]:
    """Sorted padded-mode widths ending at `max_length` (default: the powers of two).

    Raises:
        ValueError: a boundary outside [1, max_length].
    """
    if bucket_boundaries is None:
        return default_bucket_boundaries(max_length)
    boundaries = sorted(set(int(b) for b in bucket_boundaries))
    if not boundaries or boundaries[0] < 1 or boundaries[-1] > max_length:
        raise ValueError(f"bucket_boundaries must lie in [1, max_length="
                         f"{max_length}], got {list(bucket_boundaries)}")
    if boundaries[-1] != max_length:
        boundaries.append(max_length)
    return tuple(boundaries)


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
                        on_bad_row: str,
                        skip_report: SkipReport | None) -> list[int]:
    """Positions of the records that `check((index, record))` accepts.

    Runs once over all records, in order. A record `check` rejects with a
    DataError raises it (on_bad_row="raise") or is counted in `skip_report`
    and left out (on_bad_row="skip"; without a report, the count is logged
    as a warning).

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
            check((index, record))
        except DataError as e:
            if on_bad_row == "raise":
                raise
            report.add(e)
            continue
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


@dataclasses.dataclass
class _TokenizeSFT:
    """Picklable map function: (index, record) -> example; DataError names the record."""

    tokenizer: TokenizerLike
    max_length: int
    max_prompt_length: int | None
    truncation: str
    add_bos: bool

    def __call__(self, item):
        index, record = item
        try:
            return tokenize_prompt_completion(
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
) -> list[Mapping]:
    """The records `make_sft_dataset` with these arguments would keep.

    For a training run to check (and count) its records once at start-up, in
    the report that counted the file's bad rows; building datasets from the
    returned list then skips nothing. Arguments as in `make_sft_dataset`.
    """
    tokenize = _TokenizeSFT(tokenizer, max_length, max_prompt_length, truncation,
                            add_bos)
    kept = tokenizable_indices(records, tokenize, on_bad_row=on_bad_row,
                               skip_report=skip_report)
    return [records[i] for i in kept]


def _row_layout(length: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """segment_ids and positions of a row holding one sequence of `length`."""
    segment_ids = np.zeros(width, np.int32)
    segment_ids[:length] = 1
    positions = np.zeros(width, np.int32)
    positions[:length] = np.arange(length, dtype=np.int32)
    return segment_ids, positions


def pad_batch(examples: Sequence[Mapping[str, np.ndarray]], *, batch_size: int,
              boundaries: Sequence[int], pad_id: int) -> dict[str, np.ndarray]:
    """Stacks one example per row, padded to the smallest fitting boundary.

    `examples` hold 1-D `tokens` and `loss_mask`; fewer than `batch_size`
    examples (the end of a finite run) are topped up with all-padding rows.
    """
    longest = max(len(ex["tokens"]) for ex in examples)
    width = next((b for b in boundaries if b >= longest), None)
    if width is None:
        raise ValueError(f"sequence of length {longest} exceeds the largest "
                         f"bucket boundary {boundaries[-1]}")
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
        bucket_boundaries: padded-mode row widths; default powers of two from
            64, ending at max_length (always appended). Unused when packing.
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
    examples = tokenized_examples(records, tokenize, seed=seed, shuffle=shuffle,
                                  num_epochs=num_epochs, shard_index=shard_index,
                                  shard_count=shard_count, on_bad_row=on_bad_row,
                                  skip_report=skip_report, read_options=read_options)
    if packing:
        return pack_and_batch(examples, batch_size=batch_size,
                              max_length=max_length, pad_id=tokenizer.pad_id,
                              seed=seed, shuffle=shuffle)
    boundaries = resolve_bucket_boundaries(bucket_boundaries, max_length)
    return examples.batch(batch_size, batch_fn=functools.partial(
        pad_batch, batch_size=batch_size, boundaries=boundaries,
        pad_id=tokenizer.pad_id))
