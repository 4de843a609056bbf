"""make_sft_dataset: fixed shapes, packing invariants, sharding, checkpointable state."""

import collections
import copy
import itertools
import json
import re

import grain
import numpy as np
import pytest

from jalign.data import (DataError, SkipReport, load_records, make_sft_dataset,
                         records_from_dicts)

MAX_LENGTH = 32
BOUNDARIES = (8, 16, MAX_LENGTH)
READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def make_records(n=30):
    """Records of varied lengths whose text names them: "q<i>:" -> "<x * (i % 9)>a<i>"."""
    rows = [{"prompt": f"q{i}:", "completion": "x" * (i % 9) + f"a{i}"} for i in range(n)]
    return records_from_dicts(rows, required_fields=("prompt", "completion"))[0]


def make(tokenizer, records=None, **kwargs):
    kwargs = {"batch_size": 4, "max_length": MAX_LENGTH, "seed": 0,
              "bucket_boundaries": BOUNDARIES, "read_options": READ, **kwargs}
    return make_sft_dataset(make_records() if records is None else records,
                            tokenizer, **kwargs)


def segments(batch):
    """Yields (tokens, loss_mask, positions) of every segment in the batch."""
    for b in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in np.unique(seg[seg > 0]):
            where = seg == s
            yield batch["tokens"][b, where], batch["loss_mask"][b, where], \
                batch["positions"][b, where]


def example_names(batches, tokenizer):
    """The completion text of every segment: one entry per example seen."""
    names = []
    for batch in batches:
        for tokens, mask, _ in segments(batch):
            names.append(tokenizer.decode(tokens[mask == 1]))
    return names


def expected_names(records):
    return sorted(r["completion"] for r in records)


def check_layout(batch, tokenizer, width):
    assert set(batch) == {"tokens", "loss_mask", "segment_ids", "positions"}
    for v in batch.values():
        assert v.shape == (4, width) and v.dtype == np.int32
    pad = batch["segment_ids"] == 0
    assert (batch["tokens"][pad] == tokenizer.pad_id).all()
    assert (batch["loss_mask"][pad] == 0).all() and (batch["positions"][pad] == 0).all()
    for tokens, mask, positions in segments(batch):
        np.testing.assert_array_equal(positions, np.arange(len(tokens)))
        assert mask[0] == 0 and tokens[0] == tokenizer.bos_id
        assert mask[-1] == 1 and tokens[-1] == tokenizer.eos_id


@pytest.mark.parametrize("packing", [False, True])
def test_one_epoch_holds_every_example_once(tokenizer, packing):
    # Many tokenizers pad with EOS; a pad id other than grain's default 0 also
    # shows that packing pads with it.
    tokenizer = copy.copy(tokenizer)
    tokenizer.pad_id = tokenizer.eos_id
    records = make_records()
    batches = list(make(tokenizer, records, num_epochs=1, packing=packing))
    assert example_names(batches, tokenizer) != expected_names(records)  # shuffled
    assert sorted(example_names(batches, tokenizer)) == expected_names(records)
    for batch in batches:
        check_layout(batch, tokenizer, batch["tokens"].shape[1])
    if packing:
        assert all(b["tokens"].shape[1] == MAX_LENGTH for b in batches)
        # Packing fits more than one example in some row.
        assert max(b["segment_ids"].max() for b in batches) > 1
    else:
        assert len(batches) == 8  # ceil(30 / 4); the last one topped up with padding
        assert (batches[-1]["segment_ids"][2:] == 0).all()


def test_padded_width_is_the_smallest_fitting_bucket(tokenizer):
    widths = set()
    for batch in itertools.islice(iter(make(tokenizer)), 20):
        longest = (batch["segment_ids"] > 0).sum(axis=1).max()
        width = batch["tokens"].shape[1]
        assert width in BOUNDARIES and width == min(b for b in BOUNDARIES if b >= longest)
        assert (batch["segment_ids"] <= 1).all()
        widths.add(width)
    assert widths == {16, 32}  # the lengths here run from 8 to 18 tokens


def test_default_width_is_the_longest_rounded_to_64_within_max_length(tokenizer):
    batch = next(iter(make(tokenizer, bucket_boundaries=None, max_length=100)))
    assert batch["tokens"].shape[1] == 64  # rows of 8 to 18 tokens
    batch = next(iter(make(tokenizer, bucket_boundaries=None, max_length=20)))
    assert batch["tokens"].shape[1] == 20


def test_packed_rows_respect_max_length_and_restart_positions(tokenizer):
    for batch in itertools.islice(iter(make(tokenizer, packing=True, max_length=24)), 10):
        assert batch["tokens"].shape == (4, 24)
        seg = batch["segment_ids"]
        starts = (batch["positions"] == 0) & (seg > 0)
        assert (batch["loss_mask"][starts] == 0).all()
        # Segment ids run 1..k contiguously in each row, padding only at the end.
        for row in seg:
            k = row.max()
            np.testing.assert_array_equal(np.unique(row[row > 0]), np.arange(1, k + 1))
            assert (np.diff(row[row > 0]) >= 0).all() and (row[(row > 0).sum():] == 0).all()
        check_layout(batch, tokenizer, 24)


def test_shards_are_disjoint_and_cover(tokenizer):
    records = make_records(31)
    names = [example_names(make(tokenizer, records, num_epochs=1, shard_index=i,
                                shard_count=3), tokenizer) for i in range(3)]
    assert [len(n) for n in names] == [11, 10, 10]
    assert sorted(sum(names, [])) == expected_names(records)
    with pytest.raises(ValueError, match="shard_index"):
        make(tokenizer, shard_index=3, shard_count=3)


def test_epochs_repeat_with_a_new_order_and_seed_determines_everything(tokenizer):
    records = make_records()
    two = example_names(make(tokenizer, records, num_epochs=2, batch_size=5), tokenizer)
    first, second = two[:30], two[30:]
    assert sorted(first) == sorted(second) == expected_names(records) and first != second

    def first_batches(seed):
        return list(itertools.islice(iter(make(tokenizer, records, seed=seed)), 3))
    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert example_names(a, tokenizer) != example_names(c, tokenizer)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("taken", [1, 9])  # 9 batches cross an epoch boundary
def test_iterator_state_round_trip(tokenizer, packing, taken):
    records = make_records()
    it = iter(make(tokenizer, records, packing=packing))
    for _ in range(taken):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]

    resumed = iter(make(tokenizer, records, packing=packing))
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(6))):
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_prompt_too_long_raises_with_origin_or_is_skipped(tokenizer):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    rows[3]["prompt"] = "z" * 40
    records = records_from_dicts(rows, required_fields=("prompt", "completion"),
                                 name="toy")[0]
    with pytest.raises(DataError, match=r"toy\[3\]: prompt is 41 tokens"):
        list(make(tokenizer, records, num_epochs=1))
    report = SkipReport()
    batches = list(make(tokenizer, records, num_epochs=1, on_bad_row="skip",
                        skip_report=report))
    assert sorted(example_names(batches, tokenizer)) == [f"a{i}" for i in (0, 1, 2, 4, 5)]
    assert report.counts == collections.Counter(prompt_too_long=1)
    assert report.examples[0].startswith("toy[3]: prompt is 41 tokens")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _chat(role, prompt, completion):
    return {"prompt": [{"role": role, "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}]}


def test_rows_that_do_not_tokenise_are_counted_once_with_the_file_rows(
        role_checking_tokenizer, tmp_path):
    """on_bad_row="skip": tokenisation skips join the file's SkipReport when the dataset
    is built (not per epoch, not per shard), and the batches hold only the good rows."""
    tokenizer = role_checking_tokenizer
    path = _write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "q0", "completion": "a0"},
        {"prompt": "q1"},                                 # 2: missing completion (file level)
        {"prompt": "z" * 40, "completion": "a2"},         # 3: prompt fills max_length
        _chat("user", "q3", "a3"),
        _chat("wizard", "q4", "a4"),                      # 5: the template raises
        {"prompt": "q5", "completion": "a5"},
    ])
    records, report = load_records(path, required_fields=("prompt", "completion"),
                                   on_bad_row="skip")
    assert dict(report.counts) == {"missing_field": 1}
    shards = [make(tokenizer, records, num_epochs=2, on_bad_row="skip", skip_report=report,
                   shard_index=i, shard_count=2) for i in range(2)]
    # Each process counts every record once, whatever its shard.
    assert dict(report.counts) == {"missing_field": 1, "prompt_too_long": 2,
                                   "chat_template": 2}
    single = SkipReport()
    make(tokenizer, records, on_bad_row="skip", skip_report=single)
    assert dict(single.counts) == {"prompt_too_long": 1, "chat_template": 1}
    summary = single.summary()
    assert summary.startswith("skipped 2 rows (chat_template: 1, prompt_too_long: 1); "
                              "first examples:")
    assert f"{path}:3: prompt is 41 tokens (with BOS)" in summary
    assert f"{path}:5: chat template failed: TemplateError: unknown role wizard" in summary

    names = [example_names(list(shard), tokenizer) for shard in shards]
    # Reading two epochs counts nothing more.
    assert report.total == 5
    # The shards are disjoint, cover the good rows, and see each once per epoch.
    assert not set(names[0]) & set(names[1])
    assert sorted(names[0] + names[1]) == sorted(2 * ["a0", "a3\n", "a5"])


def test_rows_that_do_not_tokenise_raise_naming_file_and_line(role_checking_tokenizer,
                                                              tmp_path):
    tokenizer = role_checking_tokenizer
    long_prompt = _write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "q0", "completion": "a0"}, {"prompt": "z" * 40, "completion": "a1"}])
    bad_role = _write_jsonl(tmp_path / "roles.jsonl", [
        _chat("user", "q0", "a0"), _chat("user", "q1", "a1"), _chat("wizard", "q2", "a2")])
    for path, message in ((long_prompt, ":2: prompt is 41 tokens"),
                          (bad_role, ":3: chat template failed: TemplateError: unknown role "
                                     "wizard")):
        records, _ = load_records(path, required_fields=("prompt", "completion"))
        # Raised when the dataset is built, before any batch is read.
        with pytest.raises(DataError, match=re.escape(path + message)):
            make(tokenizer, records)
