"""Padding follows the data: rows pad to the batch's longest sequence rounded up to a
multiple (or to explicit buckets), and every process of a multi-process run pads step k
to the same width."""

import itertools

import grain
import numpy as np
import pytest

from jalign.data import (RowWidths, default_bucket_boundaries, make_preference_dataset,
                         make_sft_dataset, make_unpaired_dataset, records_from_dicts)
from jalign.data.preference import preference_records_from_dicts

READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
MAX_LENGTH = 1024
RNG = np.random.default_rng(0)
# Mixed lengths as in chat data: [BOS] + 20..80 prompt + 10..900 completion + [EOS].
LENGTHS = [(int(p), int(c)) for p, c in zip(RNG.integers(20, 80, 64),
                                            RNG.integers(10, 900, 64))]


def _sft_rows():
    return [{"prompt": f"{i:03d}" + "p" * (p - 3), "completion": "c" * c}
            for i, (p, c) in enumerate(LENGTHS)]


def _longest(batch, key="segment_ids"):
    return int((batch[key] > 0).sum(axis=1).max())


def test_row_widths():
    widths = RowWidths(1000)
    assert [widths.width(n) for n in (1, 64, 65, 394, 960, 961, 1000)] == [
        64, 64, 128, 448, 960, 1000, 1000]
    # One compiled program per width: at most ceil(max_length / 64) of them.
    assert len(RowWidths(1024).all_widths()) == 16
    assert RowWidths(1024, multiple=128).all_widths() == tuple(range(128, 1025, 128))
    buckets = RowWidths(1000, boundaries=default_bucket_boundaries(1000))
    assert [buckets.width(n) for n in (1, 65, 394, 600)] == [64, 128, 512, 1000]
    assert buckets.all_widths() == (64, 128, 256, 512, 1000)
    with pytest.raises(ValueError, match="exceeds max_length 1000"):
        widths.width(1001)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1"):
        RowWidths(1000, multiple=0)


@pytest.mark.parametrize("multiple", [64, 16])
def test_sft_rows_pad_to_the_longest_rounded_up(tokenizer, multiple):
    records = records_from_dicts(_sft_rows(), required_fields=("prompt", "completion"))[0]
    ds = make_sft_dataset(records, tokenizer, batch_size=4, max_length=MAX_LENGTH, seed=0,
                          pad_to_multiple_of=multiple, read_options=READ)
    widths = set()
    for batch in itertools.islice(iter(ds), 16):
        width, longest = batch["tokens"].shape[1], _longest(batch)
        assert width == -(-longest // multiple) * multiple
        widths.add(width)
    assert len(widths) > 4  # the widths follow the data


def test_explicit_buckets_are_still_an_option(tokenizer):
    records = records_from_dicts(_sft_rows(), required_fields=("prompt", "completion"))[0]
    boundaries = default_bucket_boundaries(MAX_LENGTH)
    ds = make_sft_dataset(records, tokenizer, batch_size=4, max_length=MAX_LENGTH, seed=0,
                          bucket_boundaries=boundaries, read_options=READ)
    for batch in itertools.islice(iter(ds), 8):
        assert batch["tokens"].shape[1] == min(b for b in boundaries if b >= _longest(batch))


def _pairs(paired):
    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "r" * (7 + i % 50)}
            for i, r in enumerate(_sft_rows())]
    if not paired:
        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in rows for side in ("chosen", "rejected")]
    return preference_records_from_dicts(rows, paired=paired)[0]


@pytest.mark.parametrize("paired", [True, False])
def test_preference_rows_pad_to_the_longest_rounded_up(tokenizer, paired):
    make = make_preference_dataset if paired else make_unpaired_dataset
    ds = make(_pairs(paired), tokenizer, batch_size=4, max_length=MAX_LENGTH, seed=0,
              read_options=READ)
    for batch in itertools.islice(iter(ds), 8):
        longest = _longest(batch) if paired else max(_longest(batch),
                                                     _longest(batch, "kl_segment_ids"))
        assert batch["tokens"].shape[1] == -(-longest // 64) * 64


def _shard_batches(make, records, tokenizer, shards, steps, **kwargs):
    """[step][shard] batches of every shard's dataset, as each process would build it."""
    iters = [iter(make(records, tokenizer, batch_size=4, max_length=MAX_LENGTH, seed=0,
                       shard_index=k, shard_count=shards, read_options=READ, **kwargs))
             for k in range(shards)]
    return [[next(it) for it in iters] for _ in range(steps)]


@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("kind", ["sft", "paired", "unpaired"])
def test_every_process_pads_step_k_to_one_width(tokenizer, kind, shards):
    """Process-local batches of different widths could not form one global batch: each
    shard pads its step-k batch to the longest row of all shards' step-k batches."""
    if kind == "sft":
        make, records = make_sft_dataset, records_from_dicts(
            _sft_rows(), required_fields=("prompt", "completion"))[0]
    else:
        make = make_preference_dataset if kind == "paired" else make_unpaired_dataset
        records = _pairs(kind == "paired")
    local_widths_differ, global_widths = False, set()
    for batches in _shard_batches(make, records, tokenizer, shards, steps=12):
        widths = {b["tokens"].shape[1] for b in batches}
        assert len(widths) == 1
        longest = max(max(_longest(b), _longest(b, "kl_segment_ids") if kind == "unpaired"
                          else 0) for b in batches)
        width = widths.pop()
        assert width == -(-longest // 64) * 64
        local = {-(-_longest(b) // 64) * 64 for b in batches}
        local_widths_differ |= len(local) > 1
        global_widths.add(width)
    assert local_widths_differ  # the test data does need the agreement
    assert len(global_widths) > 1 and max(global_widths) <= MAX_LENGTH


def test_shared_width_survives_a_resume(tokenizer):
    records = records_from_dicts(_sft_rows(), required_fields=("prompt", "completion"))[0]
    args = dict(batch_size=4, max_length=MAX_LENGTH, seed=0, shard_index=1, shard_count=2,
                read_options=READ)
    it = iter(make_sft_dataset(records, tokenizer, **args))
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(20)]  # crosses an epoch (32 records a shard)
    resumed = iter(make_sft_dataset(records, tokenizer, **args))
    resumed.set_state(state)
    for a, b in zip(want, [next(resumed) for _ in range(20)]):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
