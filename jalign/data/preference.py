"""Preference data: paired (reward model, DPO family) and unpaired (KTO) batches.

Records. Paired: "prompt", "chosen", "rejected"; unpaired: "prompt",
"completion", "label" (bool, or 0/1). Texts are strings or message lists (see
`jalign.data.sources`); optional float reference log-probs ("ref_chosen_logps"
and "ref_rejected_logps", or "ref_logps" and "ref_kl_logps") are carried into
the batch. `example_index` in a batch is the record's "_index" if it has one,
else its position in `records`, so a precompute pass can write log-probs back.

Batches are dicts of numpy arrays with static shapes (B = batch_size pairs or
examples, T = the row width):

    tokens, loss_mask, segment_ids, positions   int32 [R, T], as in SFT batches
    sequence_index  int32 [R, T]  paired: 2p for pair p's chosen tokens, 2p + 1
                                  for its rejected tokens; unpaired: the example
                                  slot p; -1 on padding
    pair_mask       float32 [B]   1 for real pairs/examples, 0 for filler slots
    example_index   int32 [B]     see above; -1 for filler
    ref_*_logps     float32 [B]   only if the records carry them; 0 for filler
  unpaired only:
    label           float32 [B]   1 desirable, 0 undesirable
    kl_tokens, kl_loss_mask, kl_segment_ids, kl_positions, kl_sequence_index
                    int32 [B, T]  the mismatched pair of slot p: its completion
                                  after another record's prompt (below)

Padded mode: one sequence per row, T = the smallest bucket boundary >= the
longest sequence in the batch; paired R = 2B (row 2p chosen, row 2p + 1
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
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jalign.data.pipeline import (_resolve_boundaries, tokenizable_indices,
                                  tokenized_examples)
from jalign.data.sft import TRUNCATION_MODES, TokenizerLike, tokenize_prompt_completion
from jalign.data.sources import (ORIGIN_KEY, DataError, SkipReport,
                                 load_records, records_from_dicts, validate_record)

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")
PAIRED_REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
UNPAIRED_REF_FIELDS = ("ref_logps", "ref_kl_logps")
INDEX_KEY = "_index"
# grain's default is 16 reader threads; tokenising is light and hosts are shared.
_ROW_KEYS = ("tokens", "loss_mask", "segment_ids", "positions", "sequence_index")
# How far to look for a valid record whose prompt a KL pair can borrow.
_MAX_KL_PARTNER_TRIES = 32


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def validate_preference_record(row: Any, origin: str, *, paired: bool = True,
                               require_ref: bool = False) -> dict:
    """Checks one paired or unpaired record; returns a new dict ("_origin" set).

    Beyond `validate_record` on the text fields: paired chosen != rejected;
    unpaired "label" is a bool or 0/1 (returned as bool); reference log-prob
    fields, if any is present (or `require_ref`), are all present and finite
    numbers (returned as float).

    Raises:
        DataError: naming `origin` and the field; reasons as in `sources`, plus
            "chosen_equals_rejected".
    """
    text_fields = PAIRED_FIELDS if paired else UNPAIRED_FIELDS[:2]
    record = validate_record(row, origin, text_fields)
    if paired and record["chosen"] == record["rejected"]:
        raise DataError(f"{origin}: chosen and rejected are identical; a preference "
                        "pair needs two different responses",
                        reason="chosen_equals_rejected")
    if not paired:
        label = record.get("label")
        if label is None:
            raise DataError(f"{origin}: field 'label' is missing",
                            reason="missing_field")
        if not (isinstance(label, (bool, np.bool_)) or (
                isinstance(label, (int, np.integer)) and label in (0, 1))):
            raise DataError(f"{origin}: field 'label' must be a bool or 0/1, got "
                            f"{_type_name(label)} {label!r}", reason="wrong_type")
        record["label"] = bool(label)
    ref_fields = PAIRED_REF_FIELDS if paired else UNPAIRED_REF_FIELDS
    if require_ref or any(f in record for f in ref_fields):
        for field in ref_fields:
            value = record.get(field)
            if value is None:
                raise DataError(f"{origin}: field '{field}' is missing (needed "
                                f"with {', '.join(ref_fields)})",
                                reason="missing_field")
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                    value, (int, float, np.integer, np.floating)):
                raise DataError(f"{origin}: field '{field}' must be a number, got "
                                f"{_type_name(value)}", reason="wrong_type")
            if not math.isfinite(value):
                raise DataError(f"{origin}: field '{field}' is {value}, not a "
                                "finite number", reason="not_finite")
            record[field] = float(value)
    return record


def _finish_records(records: list[dict], report: SkipReport, *, paired: bool,
                    on_bad_row: str, name: str) -> tuple[list[dict], SkipReport]:
    valid = []
    for record in records:
        try:
            valid.append(validate_preference_record(record, record[ORIGIN_KEY],
                                                    paired=paired))
        except DataError as e:
            if on_bad_row == "raise":
                raise
            report.add(e)
    if not valid:
        raise DataError(f"{name}: no valid records; {report.summary()}")
    for i, record in enumerate(valid):
        record[INDEX_KEY] = i
    return valid, report


def preference_records_from_dicts(rows: Sequence[Mapping[str, Any]], *,
                                  paired: bool = True, on_bad_row: str = "raise",
                                  name: str = "records") -> tuple[list[dict], SkipReport]:
    """Validates in-memory paired (or unpaired) rows, e.g. built-in task data.

    Like `records_from_dicts`, plus the checks of `validate_preference_record`;
    each kept record gets "_index", its position in the returned list.
    """
    fields = PAIRED_FIELDS if paired else UNPAIRED_FIELDS[:2]
    records, report = records_from_dicts(rows, required_fields=fields,
                                         on_bad_row=on_bad_row, name=name)
    return _finish_records(records, report, paired=paired, on_bad_row=on_bad_row,
                           name=name)


def load_preference_records(path_or_paths, *, paired: bool = True,
                            on_bad_row: str = "raise") -> tuple[list[dict], SkipReport]:
    """`load_records` for paired (or unpaired) files.

    See `preference_records_from_dicts`; "_index" is the position in the
    returned list.
    """
    fields = PAIRED_FIELDS if paired else UNPAIRED_FIELDS[:2]
    records, report = load_records(path_or_paths, required_fields=fields,
                                   on_bad_row=on_bad_row)
    return _finish_records(records, report, paired=paired, on_bad_row=on_bad_row,
                           name=str(path_or_paths))


def tokenize_preference_pair(prompt, chosen, rejected, tokenizer: TokenizerLike, *,
                             max_length: int, max_prompt_length: int | None = None,
                             truncation: str = "keep_end",
                             add_bos: bool = True) -> dict[str, np.ndarray]:
    """Tokenises a preference pair: `tokenize_prompt_completion` for each response.

    Both sequences start with the same (identically truncated) prompt; the
    prompt tokens are never scored, the response and its EOS are.

    Returns:
        dict(chosen_tokens, chosen_loss_mask, rejected_tokens,
        rejected_loss_mask), int32 1-D arrays of length <= max_length.

    Raises:
        PromptTooLongError: the prompt leaves no room for a response.
        DataError: the two sequences are identical after truncation (reason
            "chosen_equals_rejected"), or a conversation the template cannot
            split.
    """
    out = {}
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        example = tokenize_prompt_completion(
            prompt, completion, tokenizer, max_length=max_length,
            max_prompt_length=max_prompt_length, truncation=truncation,
            add_bos=add_bos)
        out[f"{name}_tokens"] = example["tokens"]
        out[f"{name}_loss_mask"] = example["loss_mask"]
    if np.array_equal(out["chosen_tokens"], out["rejected_tokens"]):
        raise DataError(f"chosen and rejected are identical after truncation to "
                        f"max_length={max_length}", reason="chosen_equals_rejected")
    return out


@dataclasses.dataclass
class _Prepare:
    """Picklable map: (index, record) -> tokenised example; DataError names the record."""

    records: Sequence[Mapping]  # For the KL partners of unpaired records.
    tokenizer: TokenizerLike
    paired: bool
    with_ref: bool
    max_length: int
    max_prompt_length: int | None
    truncation: str

    def __call__(self, item):
        index, record = item
        example = self._tokenize(index, record)
        if not self.paired:
            prompt_ids = self._kl_prompt(index)
            if prompt_ids is None:  # No valid partner: a matched pair.
                prompt_ids = example["tokens"][:example["prompt_length"]]
            completion = example["tokens"][example["prompt_length"]:]
            kl_tokens = np.concatenate([prompt_ids, completion])[:self.max_length]
            kl_mask = np.zeros_like(kl_tokens)
            kl_mask[len(prompt_ids):] = 1
            example.update(kl_tokens=kl_tokens, kl_loss_mask=kl_mask)
        return example

    def check(self, item) -> None:
        """Raises the DataError `__call__` would raise (the KL pair cannot fail)."""
        self._tokenize(*item)

    def _tokenize(self, index: int, record: Mapping) -> dict:
        origin = record.get(ORIGIN_KEY, f"records[{index}]") if isinstance(
            record, Mapping) else f"records[{index}]"
        record = validate_preference_record(record, origin, paired=self.paired,
                                            require_ref=self.with_ref)
        kwargs = dict(max_length=self.max_length, truncation=self.truncation,
                      max_prompt_length=self.max_prompt_length)
        try:
            if self.paired:
                example = tokenize_preference_pair(
                    record["prompt"], record["chosen"], record["rejected"],
                    self.tokenizer, **kwargs)
            else:
                example = tokenize_prompt_completion(
                    record["prompt"], record["completion"], self.tokenizer, **kwargs)
                # The first target is the first completion token.
                example["prompt_length"] = int(np.argmax(example["loss_mask"]))
                example["label"] = np.float32(record["label"])
        except DataError as e:
            raise DataError(f"{origin}: {e}", reason=e.reason) from None
        example["example_index"] = int(record.get(INDEX_KEY, index))
        if self.with_ref:
            for field in PAIRED_REF_FIELDS if self.paired else UNPAIRED_REF_FIELDS:
                example[field] = np.float32(record[field])
        return example

    def _kl_prompt(self, index: int) -> np.ndarray | None:
        n = len(self.records)
        for step in range(1, min(n, _MAX_KL_PARTNER_TRIES + 1)):
            partner = (index + step) % n
            try:
                example = self._tokenize(partner, self.records[partner])
            except DataError:
                continue  # Counted (or raised) when the dataset was built.
            return example["tokens"][:example["prompt_length"]]
        return None


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


def _bucket(longest: int, boundaries: Sequence[int]) -> int:
    return next(b for b in boundaries if b >= longest)  # max_length is last.


def _pad_pairs(examples, *, batch_size, boundaries, pad_id, extra_keys) -> dict:
    width = _bucket(max(len(ex[f"{side}_tokens"]) for ex in examples
                        for side in ("chosen", "rejected")), boundaries)
    batch = _empty_rows(2 * batch_size, width, pad_id)
    for p, ex in enumerate(examples):
        for side, offset in (("chosen", 0), ("rejected", 1)):
            _place(batch, 2 * p + offset, 0, 1, ex[f"{side}_tokens"],
                   ex[f"{side}_loss_mask"], 2 * p + offset)
    return batch | _slot_fields(examples, batch_size, extra_keys)


def _pad_unpaired(examples, *, batch_size, boundaries, pad_id, extra_keys) -> dict:
    width = _bucket(max(len(ex[k]) for ex in examples
                        for k in ("tokens", "kl_tokens")), boundaries)
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


def _has_ref_fields(records: Sequence[Mapping], paired: bool) -> bool:
    ref_fields = PAIRED_REF_FIELDS if paired else UNPAIRED_REF_FIELDS
    return any(isinstance(r, Mapping) and any(f in r for f in ref_fields)
               for r in records)


def tokenizable_preference_records(
    records: Sequence[Mapping], tokenizer: TokenizerLike, *, paired: bool = True,
    max_length: int, max_prompt_length: int | None = None,
    truncation: str = "keep_end", on_bad_row: str = "raise",
    skip_report: SkipReport | None = None,
) -> list[dict]:
    """The records `make_preference_dataset` (`make_unpaired_dataset` if not
    `paired`) with these arguments would keep.

    For a training run to check (and count) its records once at start-up, in
    the report that counted the file's bad rows; building datasets from the
    returned list then skips nothing. Kept records are shallow copies whose
    "_index" is renumbered to their position in the returned list (as
    `load_preference_records` numbers them), so a precompute pass can index
    arrays of that length. Other arguments as in `make_preference_dataset`.
    """
    prepare = _Prepare(records, tokenizer, paired, _has_ref_fields(records, paired),
                       max_length, max_prompt_length, truncation)
    kept = tokenizable_indices(records, prepare.check, on_bad_row=on_bad_row,
                               skip_report=skip_report)
    if len(kept) == len(records):
        return list(records)
    return [{**records[i], INDEX_KEY: j} for j, i in enumerate(kept)]


def _make_dataset(records, tokenizer, *, paired, batch_size, max_length, seed,
                  shuffle, num_epochs, packing, packed_rows, bucket_boundaries,
                  max_prompt_length, truncation, shard_index, shard_count,
                  on_bad_row, skip_report, read_options) -> grain.IterDataset:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if packing and not paired:
        raise ValueError("packing is only implemented for paired data")
    ref_fields = PAIRED_REF_FIELDS if paired else UNPAIRED_REF_FIELDS
    with_ref = _has_ref_fields(records, paired)
    extra_keys = ref_fields if with_ref else ()
    prepare = _Prepare(records, tokenizer, paired, with_ref, max_length,
                       max_prompt_length, truncation)
    examples = tokenized_examples(records, prepare, seed=seed, shuffle=shuffle,
                                  num_epochs=num_epochs, shard_index=shard_index,
                                  shard_count=shard_count, on_bad_row=on_bad_row,
                                  skip_report=skip_report, check=prepare.check,
                                  read_options=read_options)
    if packing:
        rows = max(batch_size, 2) if packed_rows is None else packed_rows
        if rows < 2:
            raise ValueError(f"packed_rows must be >= 2, got {rows}")
        return _PackedPairs(examples, batch_size=batch_size, rows=rows,
                            width=max_length, pad_id=tokenizer.pad_id,
                            extra_keys=extra_keys)
    batch_fn = _pad_pairs if paired else _pad_unpaired
    return examples.batch(batch_size, batch_fn=functools.partial(
        batch_fn, batch_size=batch_size, pad_id=tokenizer.pad_id,
        boundaries=_resolve_boundaries(bucket_boundaries, max_length),
        extra_keys=extra_keys))


def make_preference_dataset(
    records: Sequence[Mapping], tokenizer: TokenizerLike, *, batch_size: int,
    max_length: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
    packing: bool = False, packed_rows: int | None = None,
    bucket_boundaries: Sequence[int] | None = None,
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
        bucket_boundaries: padded-mode widths; default powers of two from 64,
            max_length always appended.
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
        bucket_boundaries=bucket_boundaries, max_prompt_length=max_prompt_length,
        truncation=truncation, shard_index=shard_index, shard_count=shard_count,
        on_bad_row=on_bad_row, skip_report=skip_report, read_options=read_options)


def make_unpaired_dataset(
    records: Sequence[Mapping], tokenizer: TokenizerLike, *, batch_size: int,
    max_length: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
    packing: bool = False, bucket_boundaries: Sequence[int] | None = None,
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
        max_prompt_length=max_prompt_length, truncation=truncation,
        shard_index=shard_index, shard_count=shard_count, on_bad_row=on_bad_row,
        skip_report=skip_report, read_options=read_options)
