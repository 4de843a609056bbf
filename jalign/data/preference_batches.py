"""Preference batches: paired (reward model, DPO family) and unpaired (KTO).

Records (and their validation and tokenisation) are `jalign.data.preference`'s.
Batches are dicts of numpy arrays with static shapes (B = batch_size pairs or
examples, T = the row width):

    tokens, loss_mask, segment_ids, positions   int32 [R, T], as in SFT batches
    sequence_index  int32 [R, T]  paired: 2p for pair p's chosen tokens, 2p + 1
                                  for its rejected tokens; unpaired: the example
                                  slot p; -1 on padding
    pair_mask       float32 [B]   1 for real pairs/examples, 0 for filler slots
    example_index   int32 [B]     the record's "_index", else its position in
                                  `records`; -1 for filler
    ref_*_logps     float32 [B]   only if the records carry them; 0 for filler
  unpaired only:
    label           float32 [B]   1 desirable, 0 undesirable
    kl_tokens, kl_loss_mask, kl_segment_ids, kl_positions, kl_sequence_index
                    int32 [B, T]  the mismatched pair of slot p: its completion
                                  after another record's prompt (below)

Padded mode: one sequence per row, T = the longest sequence in the batch
rounded up to `pad_to_multiple_of` (or, with `bucket_boundaries`, the smallest
boundary that fits it; in a multi-process run, the longest of all processes'
batches: `jalign.data.padding`), never above max_length; paired R = 2B (row 2p chosen, row 2p + 1
rejected), unpaired R = B (main and KL rows share T, so a step can run both in
one forward pass).

Packed mode (paired only): R = `packed_rows` (default max(B, 2)) rows of
T = max_length. Pairs are taken in order; a pair's chosen and then its
rejected go first-fit into the rows (each sequence stays within one row;
the two may share a row or not). When a pair does not fit, the batch is
emitted with the pairs placed so far (the remaining slots are filler) and
that pair opens the next batch, so every pair in a batch is complete and
R >= 2 guarantees progress.

KL pairs (KTO's KL estimate): the record at position i has its completion
paired with the prompt of the next valid record, i + 1 mod len(records), as
in TRL's KL dataset (completions shifted by one before shuffling). The pairing
is fixed per record, not per batch, so a precomputed "ref_kl_logps" stays
valid whatever the shuffle, batch size or sharding.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from jalign.data.padding import DEFAULT_PAD_TO_MULTIPLE_OF, row_widths
from jalign.data.pipeline import padded_batches, tokenized_examples
from jalign.data.preference import (PAIRED_REF_FIELDS, UNPAIRED_REF_FIELDS,
                                    TokenizePreference, has_ref_fields)
from jalign.data.sft import TRUNCATION_MODES, TokenizerLike
from jalign.data.sources import SkipReport

_ROW_KEYS = ("tokens", "loss_mask", "segment_ids", "positions", "sequence_index")


def _empty_rows(rows: int, width: int, pad_id: int, prefix: str = "") -> dict:
    batch = {prefix + k: np.zeros((rows, width), np.int32) for k in _ROW_KEYS}
    batch[prefix + "tokens"][:] = pad_id
    batch[prefix + "sequence_index"][:] = -1
    return batch


def _place(batch: dict, row: int, start: int, segment: int, tokens: np.ndarray,
           loss_mask: np.ndarray, sequence_index: int, prefix: str = "") -> None:
    span = slice(start, start + len(tokens))
    batch[prefix + "tokens"][row, span] = tokens
    batch[prefix + "loss_mask"][row, span] = loss_mask
    batch[prefix + "segment_ids"][row, span] = segment
    batch[prefix + "positions"][row, span] = np.arange(len(tokens))
    batch[prefix + "sequence_index"][row, span] = sequence_index


def _slot_fields(examples: Sequence[Mapping], batch_size: int,
                 extra_keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The [B] arrays: pair_mask, example_index and per-example floats."""
    n = len(examples)
    fields = {"pair_mask": np.zeros(batch_size, np.float32),
              "example_index": np.full(batch_size, -1, np.int32)}
    fields["pair_mask"][:n] = 1
    fields["example_index"][:n] = [ex["example_index"] for ex in examples]
    for key in extra_keys:
        fields[key] = np.zeros(batch_size, np.float32)
        fields[key][:n] = [ex[key] for ex in examples]
    return fields


def _pair_length(example: Mapping) -> int:
    return max(len(example["chosen_tokens"]), len(example["rejected_tokens"]))


def _unpaired_length(example: Mapping) -> int:
    return max(len(example["tokens"]), len(example["kl_tokens"]))


def _pad_pairs(examples, width, *, batch_size, pad_id, extra_keys) -> dict:
    batch = _empty_rows(2 * batch_size, width, pad_id)
    for p, ex in enumerate(examples):
        for side, offset in (("chosen", 0), ("rejected", 1)):
            _place(batch, 2 * p + offset, 0, 1, ex[f"{side}_tokens"],
                   ex[f"{side}_loss_mask"], 2 * p + offset)
    return batch | _slot_fields(examples, batch_size, extra_keys)


def _pad_unpaired(examples, width, *, batch_size, pad_id, extra_keys) -> dict:
    batch = _empty_rows(batch_size, width, pad_id) | _empty_rows(
        batch_size, width, pad_id, prefix="kl_")
    for p, ex in enumerate(examples):
        _place(batch, p, 0, 1, ex["tokens"], ex["loss_mask"], p)
        _place(batch, p, 0, 1, ex["kl_tokens"], ex["kl_loss_mask"], p, prefix="kl_")
    return batch | _slot_fields(examples, batch_size, ("label", *extra_keys))


def _first_fit(fill: Sequence[int], lengths: Sequence[int],
               width: int) -> list[int] | None:
    """Rows that take sequences of `lengths` one after another, first fit; or None."""
    fill = list(fill)
    rows = []
    for n in lengths:
        row = next((r for r, used in enumerate(fill) if used + n <= width), None)
        if row is None:
            return None
        rows.append(row)
        fill[row] += n
    return rows


class _PackedPairsIterator(grain.DatasetIterator):
    """Packs whole pairs into `rows` rows; a pair that does not fit waits."""

    def __init__(self, parent: grain.DatasetIterator, *, batch_size: int, rows: int,
                 width: int, pad_id: int, extra_keys: Sequence[str]):
        super().__init__(parent)
        self._batch_size, self._rows, self._width = batch_size, rows, width
        self._pad_id, self._extra_keys = pad_id, tuple(extra_keys)
        # (parent state before the pair was read, pair) for a pair that did not
        # fit the last batch; resuming from that state re-reads it.
        self._held = None

    def __next__(self) -> dict:
        batch = _empty_rows(self._rows, self._width, self._pad_id)
        fill, segments, placed = [0] * self._rows, [0] * self._rows, []
        while len(placed) < self._batch_size:
            if self._held is not None:
                (state, pair), self._held = self._held, None
            else:
                state = copy.deepcopy(self._parent.get_state())
                try:
                    pair = next(self._parent)
                except StopIteration:
                    break
            sequences = [(pair[f"{s}_tokens"], pair[f"{s}_loss_mask"])
                         for s in ("chosen", "rejected")]
            rows = _first_fit(fill, [len(t) for t, _ in sequences], self._width)
            if rows is None:
                self._held = (state, pair)
                break
            p = len(placed)
            for offset, ((tokens, mask), row) in enumerate(zip(sequences, rows)):
                segments[row] += 1
                _place(batch, row, fill[row], segments[row], tokens, mask, 2 * p + offset)
                fill[row] += len(tokens)
            placed.append(pair)
        if not placed:
            raise StopIteration
        return batch | _slot_fields(placed, self._batch_size, self._extra_keys)

    def get_state(self) -> dict:
        if self._held is not None:
            return copy.deepcopy(self._held[0])
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)
        self._held = None


class _PackedPairs(grain.IterDataset):

    def __init__(self, parent: grain.IterDataset, **config):
        super().__init__(parent)
        self._config = config

    def __iter__(self) -> _PackedPairsIterator:
        return _PackedPairsIterator(self._parent.__iter__(), **self._config)


def _make_dataset(records, tokenizer, *, paired, batch_size, max_length, seed,
                  shuffle, num_epochs, packing, packed_rows, bucket_boundaries,
                  pad_to_multiple_of, max_prompt_length, truncation, shard_index, shard_count,
                  on_bad_row, skip_report, read_options) -> grain.IterDataset:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if packing and not paired:
        raise ValueError("packing is only implemented for paired data")
    ref_fields = PAIRED_REF_FIELDS if paired else UNPAIRED_REF_FIELDS
    with_ref = has_ref_fields(records, paired)
    extra_keys = ref_fields if with_ref else ()
    prepare = TokenizePreference(records, tokenizer, paired, with_ref, max_length,
                                 max_prompt_length, truncation)
    stream = dict(seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                  shard_index=shard_index, shard_count=shard_count,
                  on_bad_row=on_bad_row, skip_report=skip_report, check=prepare.check,
                  read_options=read_options)
    if packing:
        examples = tokenized_examples(records, prepare, **stream)
        rows = max(batch_size, 2) if packed_rows is None else packed_rows
        if rows < 2:
            raise ValueError(f"packed_rows must be >= 2, got {rows}")
        return _PackedPairs(examples, batch_size=batch_size, rows=rows,
                            width=max_length, pad_id=tokenizer.pad_id,
                            extra_keys=extra_keys)
    stack_fn = functools.partial(_pad_pairs if paired else _pad_unpaired,
                                 batch_size=batch_size, pad_id=tokenizer.pad_id,
                                 extra_keys=extra_keys)
    widths = row_widths(max_length, pad_to_multiple_of=pad_to_multiple_of,
                        bucket_boundaries=bucket_boundaries)
    return padded_batches(records, prepare, stack_fn,
                          length_fn=_pair_length if paired else _unpaired_length,
                          widths=widths, batch_size=batch_size, **stream)


def make_preference_dataset(
    records: Sequence[Mapping], tokenizer: TokenizerLike, *, batch_size: int,
    max_length: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
    packing: bool = False, packed_rows: int | None = None,
    bucket_boundaries: Sequence[int] | None = None,
    pad_to_multiple_of: int = DEFAULT_PAD_TO_MULTIPLE_OF,
    max_prompt_length: int | None = None, truncation: str = "keep_end",
    shard_index: int = 0, shard_count: int = 1, on_bad_row: str = "raise",
    skip_report: SkipReport | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Paired preference batches (layout in the module docstring).

    Args:
        records: dicts with "prompt", "chosen", "rejected" (e.g. from
            `load_preference_records`); validated again and tokenised once
            when the dataset is built (see `jalign.data.pipeline`).
        tokenizer: see `TokenizerLike`.
        batch_size: pairs per batch (per process), B.
        max_length: longest sequence (BOS and EOS included); the packed row
            width and the last bucket boundary.
        seed: shuffle seed; batches are deterministic given it.
        shuffle: reshuffle the records every epoch.
        num_epochs: passes over this shard; None repeats forever. The last
            batch of a finite run has filler slots (pair_mask 0).
        packing: padding-free rows (see the module docstring).
        packed_rows: rows per packed batch, R >= 2; default max(B, 2).
        bucket_boundaries: padded-mode widths (max_length always appended),
            e.g. `default_bucket_boundaries(max_length)`; None pads to the
            batch's longest sequence rounded up to `pad_to_multiple_of`.
        pad_to_multiple_of: the rounding of padded widths without buckets.
        max_prompt_length, truncation: see `tokenize_prompt_completion`.
        shard_index, shard_count: this process's disjoint shard of records.
        on_bad_row: for a record that fails validation or tokenisation (a
            prompt that fills max_length, a chat template that raises):
            "raise" a DataError naming it, or "skip" it.
        skip_report: skipped records are counted in it by reason, once, when
            the dataset is built (over all records, not only this shard);
            without one, the count is logged as a warning.
        read_options: grain reader threads; default 2 threads.

    Returns:
        A grain.IterDataset of batch dicts; its iterators' get_state/set_state
        resume exactly.
    """
    return _make_dataset(
        records, tokenizer, paired=True, batch_size=batch_size,
        max_length=max_length, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        packing=packing, packed_rows=packed_rows,
        bucket_boundaries=bucket_boundaries, pad_to_multiple_of=pad_to_multiple_of,
        max_prompt_length=max_prompt_length, truncation=truncation, shard_index=shard_index, shard_count=shard_count,
        on_bad_row=on_bad_row, skip_report=skip_report, read_options=read_options)


def make_unpaired_dataset(
    records: Sequence[Mapping], tokenizer: TokenizerLike, *, batch_size: int,
    max_length: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
    packing: bool = False, bucket_boundaries: Sequence[int] | None = None,
    pad_to_multiple_of: int = DEFAULT_PAD_TO_MULTIPLE_OF,
    max_prompt_length: int | None = None, truncation: str = "keep_end",
    shard_index: int = 0, shard_count: int = 1, on_bad_row: str = "raise",
    skip_report: SkipReport | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Unpaired (KTO) batches with labels and KL pairs; padded mode only.

    Arguments as in `make_preference_dataset`; records hold "prompt",
    "completion" and "label". `packing=True` raises ValueError.
    """
    return _make_dataset(
        records, tokenizer, paired=False, batch_size=batch_size,
        max_length=max_length, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        packing=packing, packed_rows=None, bucket_boundaries=bucket_boundaries,
        pad_to_multiple_of=pad_to_multiple_of, max_prompt_length=max_prompt_length,
        truncation=truncation,
        shard_index=shard_index, shard_count=shard_count, on_bad_row=on_bad_row,
        skip_report=skip_report, read_options=read_options)
