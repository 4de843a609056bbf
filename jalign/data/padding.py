"""Row widths of padded batches: padding that follows the data, the same on every process.

A padded batch holds one sequence per row, padded to a common width T. Each
distinct T is one compiled program of the train step, and every padding token
costs as much compute as a real one, so T trades compilations for waste:

  * `RowWidths(max_length, multiple=64)` (the default): T is the batch's
    longest sequence rounded up to a multiple of 64, capped at max_length.
    Waste < 64 tokens a row; at most ceil(max_length / 64) programs (16 at
    max_length 1024), each compiled once, the first time a batch needs it.
  * `RowWidths(max_length, boundaries=...)`: buckets; T is the smallest
    boundary that fits (`default_bucket_boundaries` gives powers of two:
    few programs, but a 394-token batch pads to 512).

In a multi-process run every process stacks its rows into one global batch,
so all must pick the same T for step k: `SharedWidth` computes it from the
records alone (see `jalign.data.pipeline.padded_batches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import grain

DEFAULT_PAD_TO_MULTIPLE_OF = 64


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


@dataclasses.dataclass(frozen=True)
class RowWidths:
    """The row width of a padded batch, from the longest sequence it holds.

    Default: that length rounded up to a multiple of `multiple` (capped at
    `max_length`), so padding follows the data. With `boundaries`: the
    smallest boundary that fits it (buckets). Each distinct width is one
    compiled program of the step: at most ceil(max_length / multiple) of them
    (16 at max_length 1024 and multiple 64), against log2 many buckets that
    can pad a row to twice its length.
    """

    max_length: int
    multiple: int = DEFAULT_PAD_TO_MULTIPLE_OF
    boundaries: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.multiple < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.multiple}")
        if self.boundaries is not None:
            object.__setattr__(self, "boundaries",
                               resolve_bucket_boundaries(self.boundaries, self.max_length))

    def width(self, longest: int) -> int:
        if longest > self.max_length:
            raise ValueError(f"sequence of length {longest} exceeds max_length "
                             f"{self.max_length}")
        if self.boundaries is not None:
            return next(b for b in self.boundaries if b >= longest)  # max_length is last.
        return min(-(-longest // self.multiple) * self.multiple, self.max_length)

    def all_widths(self) -> tuple[int, ...]:
        """Every width a batch can have: the bound on compiled step programs."""
        if self.boundaries is not None:
            return self.boundaries
        return tuple(sorted({self.width(n) for n in range(1, self.max_length + 1)}))


def row_widths(max_length: int, *, pad_to_multiple_of: int = DEFAULT_PAD_TO_MULTIPLE_OF,
               bucket_boundaries: Sequence[int] | None = None) -> RowWidths:
    """`RowWidths` from the dataset arguments (explicit buckets win over the multiple)."""
    return RowWidths(max_length, pad_to_multiple_of,
                     None if bucket_boundaries is None else tuple(bucket_boundaries))


def with_position(position: int, item):
    return position, item


@dataclasses.dataclass
class Positioned:
    """(position in the shard's stream, item) -> tokenize(item) with "_position" set."""

    tokenize: Callable

    def __call__(self, item):
        position, inner = item
        return {**self.tokenize(inner), "_position": position}


@dataclasses.dataclass
class LocalWidth:
    """One shard: the batch's own longest example decides its width."""

    widths: RowWidths
    length_fn: Callable[[Mapping], int]

    def __call__(self, examples: Sequence[Mapping]) -> int:
        return self.widths.width(max(self.length_fn(ex) for ex in examples))


@dataclasses.dataclass
class SharedWidth:
    """Several shards: batch k is as wide as the longest example of any shard's batch k.

    Every process can list every shard's stream (`epoch_dataset` is a pure
    function of its arguments) and tokenise any record, so all processes pick
    the same width for step k without communicating: one global batch, one shape.
    Record lengths are memoised, so each record is tokenised here at most once.
    """

    widths: RowWidths
    length_fn: Callable[[Mapping], int]
    tokenize: Callable
    records: Sequence[Mapping]
    streams: Sequence[grain.MapDataset]  # every shard's (index, record) stream
    batch_size: int
    lengths: dict = dataclasses.field(default_factory=dict)

    def _length(self, index: int) -> int:
        # Past the first epoch grain numbers elements on (len(records) + i for record i).
        index %= len(self.records)
        if index not in self.lengths:
            self.lengths[index] = self.length_fn(self.tokenize((index, self.records[index])))
        return self.lengths[index]

    def __call__(self, examples: Sequence[Mapping]) -> int:
        start = examples[0]["_position"] // self.batch_size * self.batch_size
        longest = max(self._length(stream[j][0]) for stream in self.streams
                      for j in range(start, min(start + self.batch_size, len(stream))))
        own = max(self.length_fn(ex) for ex in examples)
        assert own <= longest, (own, longest)  # this shard's batch is among them
        return self.widths.width(longest)


@dataclasses.dataclass
class PadBatch:
    """grain batch_fn: `stack_fn(examples, width)` at the width `width_fn` picks."""

    stack_fn: Callable
    width_fn: Callable

    def __call__(self, examples):
        return self.stack_fn(examples, self.width_fn(examples))
