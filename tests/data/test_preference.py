"""Preference pipelines: validation, pair layout (padded and packed), KTO batches."""

import itertools
import json
import re

import grain
import numpy as np
import pytest

from jalign.data import (
    DataError,
    SkipReport,
    load_preference_records,
    make_preference_dataset,
    make_unpaired_dataset,
    preference_records_from_dicts,
    records_from_dicts,
    tokenizable_preference_records,
    tokenize_preference_pair,
)
from jalign.tasks import get_task

MAX_LENGTH = 32
BOUNDARIES = (8, 16, MAX_LENGTH)
READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def pair_rows(n=22):
    """Pairs of varied lengths whose texts name them."""
    return [{"prompt": f"q{i}:", "chosen": "c" * (i % 7) + f"C{i}",
             "rejected": "r" * (i % 5) + f"R{i}"} for i in range(n)]


def unpaired_rows(n=10):
    return [{"prompt": f"q{i}:" + "p" * (i % 3), "completion": "x" * (i % 4) + f"a{i}",
             "label": i % 3 == 0} for i in range(n)]


def make(tokenizer, records, **kwargs):
    kwargs = {"batch_size": 4, "max_length": MAX_LENGTH, "seed": 0,
              "bucket_boundaries": BOUNDARIES, "read_options": READ, **kwargs}
    return make_preference_dataset(records, tokenizer, **kwargs)


def make_unpaired(tokenizer, records, **kwargs):
    kwargs = {"batch_size": 4, "max_length": MAX_LENGTH, "seed": 0,
              "bucket_boundaries": BOUNDARIES, "read_options": READ, **kwargs}
    return make_unpaired_dataset(records, tokenizer, **kwargs)


def sequence(batch, index, prefix=""):
    """(tokens, loss_mask, positions) of the sequence `index`, checked to be one segment."""
    where = batch[prefix + "sequence_index"] == index
    rows = np.unique(np.nonzero(where)[0])
    assert len(rows) == 1, "a sequence must lie within one row"
    row = rows[0]
    segments = np.unique(batch[prefix + "segment_ids"][row, where[row]])
    assert len(segments) == 1 and segments[0] > 0
    # Contiguous, and the whole segment.
    assert (where[row] == (batch[prefix + "segment_ids"][row] == segments[0])).all()
    span = np.nonzero(where[row])[0]
    assert (np.diff(span) == 1).all()
    return (batch[prefix + "tokens"][row, span], batch[prefix + "loss_mask"][row, span],
            batch[prefix + "positions"][row, span])


def check_pairs(batch, records, tokenizer, *, rows, width):
    """Every real pair reconstructs to its record's text; returns the example indices."""
    assert batch["tokens"].shape == (rows, width)
    for key in ("tokens", "loss_mask", "segment_ids", "positions", "sequence_index"):
        assert batch[key].dtype == np.int32 and batch[key].shape == (rows, width)
    assert batch["pair_mask"].dtype == np.float32 and batch["pair_mask"].shape == (4,)
    assert batch["example_index"].dtype == np.int32
    pad = batch["segment_ids"] == 0
    assert (batch["sequence_index"][pad] == -1).all()
    assert (batch["sequence_index"][~pad] >= 0).all()
    assert (batch["tokens"][pad] == tokenizer.pad_id).all()
    assert (batch["loss_mask"][pad] == 0).all()
    seen = []
    for p in range(4):
        if batch["pair_mask"][p] == 0:
            assert batch["example_index"][p] == -1
            assert not np.isin(batch["sequence_index"], [2 * p, 2 * p + 1]).any()
            continue
        record = records[batch["example_index"][p]]
        seen.append(int(batch["example_index"][p]))
        for offset, field in enumerate(("chosen", "rejected")):
            tokens, mask, positions = sequence(batch, 2 * p + offset)
            np.testing.assert_array_equal(positions, np.arange(len(tokens)))
            # Independent of the tokenizer helpers: prompt tokens never scored,
            # the response and EOS always.
            np.testing.assert_array_equal(
                tokens[mask == 0],
                [tokenizer.bos_id] + tokenizer.encode(record["prompt"]))
            np.testing.assert_array_equal(
                tokens[mask == 1], tokenizer.encode(record[field]) + [tokenizer.eos_id])
    return seen


def test_validation_raises_naming_file_line_field_or_skips(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    lines = [json.dumps(good),
             json.dumps({"prompt": "p", "chosen": "a"}),
             json.dumps({**good, "chosen": "  "}),
             json.dumps({**good, "rejected": 3}),
             json.dumps({**good, "rejected": "a"}),
             json.dumps({**good, "ref_chosen_logps": -1.0}),
             json.dumps({**good, "ref_chosen_logps": "x", "ref_rejected_logps": 0})]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes("\n".join(lines).encode() + b'\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=f"{path}:2: field 'rejected' is missing"):
        load_preference_records(str(path))
    records, report = load_preference_records(str(path), on_bad_row="skip")
    assert [r["_index"] for r in records] == [0]
    assert dict(report.counts) == {"missing_field": 2, "empty_field": 1, "wrong_type": 2,
                                   "chosen_equals_rejected": 1, "invalid_utf8": 1}
    assert f"{path}:5: chosen and rejected are identical" in "\n".join(report.examples)
    identical = tmp_path / "identical.jsonl"
    identical.write_text(lines[0] + "\n" + lines[4] + "\n")
    with pytest.raises(DataError, match=f"{identical}:2: chosen and rejected are identical"):
        load_preference_records(str(identical))


def test_unpaired_labels_must_be_bool_or_zero_one():
    rows = [{"prompt": "p", "completion": "c", "label": label}
            for label in (True, 0, 1, np.bool_(False), "yes", 2, 0.5, None)]
    records, report = preference_records_from_dicts(rows, paired=False, on_bad_row="skip")
    assert [r["label"] for r in records] == [True, False, True, False]
    assert all(type(r["label"]) is bool for r in records)
    assert dict(report.counts) == {"wrong_type": 3, "missing_field": 1}
    with pytest.raises(DataError, match=r"records\[4\]: field 'label' must be a bool or 0/1"):
        preference_records_from_dicts(rows, paired=False)


def test_chosen_equals_rejected_in_the_dataset_raises_or_is_counted(tokenizer):
    rows = pair_rows(6)
    rows[2]["rejected"] = rows[2]["chosen"]
    # Identical only after truncation to max_length.
    rows[4] = {"prompt": "q", "chosen": "s" * 40 + "A", "rejected": "s" * 40 + "B"}
    records, _ = records_from_dicts(rows, required_fields=("prompt", "chosen", "rejected"))
    with pytest.raises(DataError, match=r"records\[2\]: chosen and rejected are identical"):
        list(make(tokenizer, records, shuffle=False, num_epochs=1))
    report = SkipReport()
    batches = list(make(tokenizer, records, num_epochs=1, on_bad_row="skip",
                        skip_report=report))
    assert dict(report.counts) == {"chosen_equals_rejected": 2}
    assert "records[4]: chosen and rejected are identical after truncation" in \
        "\n".join(report.examples)
    seen = [i for b in batches for i in check_pairs(b, records, tokenizer, rows=8,
                                                     width=b["tokens"].shape[1])]
    assert sorted(seen) == [0, 1, 3, 5]


def test_prompt_too_long_raises_with_origin_or_is_skipped(tokenizer):
    rows = pair_rows(5)
    rows[3]["prompt"] = "x" * 40
    records, _ = preference_records_from_dicts(rows)
    with pytest.raises(DataError, match=r"records\[3\]: prompt is 41 tokens") as e:
        list(make(tokenizer, records, num_epochs=1))
    assert e.value.reason == "prompt_too_long"
    report = SkipReport()
    batches = list(make(tokenizer, records, num_epochs=1, on_bad_row="skip",
                        skip_report=report))
    assert dict(report.counts) == {"prompt_too_long": 1}
    assert sum(b["pair_mask"].sum() for b in batches) == 4


@pytest.mark.parametrize("packing", [False, True])
def test_one_epoch_reconstructs_every_pair_exactly(tokenizer, packing):
    records, _ = preference_records_from_dicts(pair_rows())
    batches = list(make(tokenizer, records, num_epochs=1, packing=packing))
    seen = []
    for batch in batches:
        width = MAX_LENGTH if packing else batch["tokens"].shape[1]
        if not packing:
            longest = (batch["segment_ids"] > 0).sum(axis=1).max()
            assert width == min(b for b in BOUNDARIES if b >= longest)
            # Row 2p holds pair p's chosen, row 2p + 1 its rejected.
            for row in range(8):
                assert set(batch["sequence_index"][row]) <= {row, -1}
        seen += check_pairs(batch, records, tokenizer, rows=8 if not packing else 4,
                            width=width)
    assert sorted(seen) == list(range(len(records)))


def test_packed_rows_hold_several_segments_and_carry_pairs_over(tokenizer):
    records, _ = preference_records_from_dicts(pair_rows())
    batches = list(make(tokenizer, records, shuffle=False, num_epochs=1, packing=True,
                        packed_rows=2))
    assert max(b["segment_ids"].max() for b in batches) >= 2
    # In order, no pair lost or split: the pairs that did not fit open the next batch.
    order = [i for b in batches for i in b["example_index"] if i >= 0]
    assert order == list(range(len(records)))
    assert any(b["pair_mask"].sum() < 4 for b in batches[:-1])
    for batch in batches:
        assert batch["tokens"].shape == (2, MAX_LENGTH)
        check_pairs(batch, records, tokenizer, rows=2, width=MAX_LENGTH)
    for batch in batches:
        starts = np.diff(batch["segment_ids"], axis=1, prepend=0) != 0
        assert (batch["loss_mask"][starts] == 0).all()
        assert (batch["positions"][starts & (batch["segment_ids"] > 0)] == 0).all()


def test_filler_pairs_at_the_end_of_a_finite_run(tokenizer):
    records, _ = preference_records_from_dicts(pair_rows(10))
    batches = list(make(tokenizer, records, num_epochs=1))
    assert len(batches) == 3
    last = batches[-1]
    np.testing.assert_array_equal(last["pair_mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(last["example_index"][2:], [-1, -1])
    assert (last["segment_ids"][4:] == 0).all() and (last["sequence_index"][4:] == -1).all()
    assert (last["loss_mask"][4:] == 0).all()


def test_conversational_pairs_render_with_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "sort: 3 1"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "1 3"}],
             "rejected": [{"role": "assistant", "content": "3 1"}]}]
    records, _ = preference_records_from_dicts(rows)
    batch = next(iter(make(tokenizer, records, num_epochs=1, max_length=64)))
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True))
    assert prompt_ids[0] == tokenizer.bos_id  # The template writes BOS once.
    for index, field in ((0, "chosen"), (1, "rejected")):
        tokens, mask, _ = sequence(batch, index)
        full = tokenizer.encode(tokenizer.apply_chat_template(prompt + rows[0][field]))
        np.testing.assert_array_equal(tokens, full)
        assert (mask[:len(prompt_ids)] == 0).all() and (mask[len(prompt_ids):] == 1).all()
    pair = tokenize_preference_pair(prompt, rows[0]["chosen"], rows[0]["rejected"],
                                    tokenizer, max_length=MAX_LENGTH, max_prompt_length=4)
    # keep_end: the same last prompt tokens before both responses.
    np.testing.assert_array_equal(pair["chosen_tokens"][:5], pair["rejected_tokens"][:5])
    np.testing.assert_array_equal(pair["chosen_tokens"][:5],
                                  [tokenizer.bos_id] + prompt_ids[-4:])


def test_unpaired_batches_carry_labels_and_mismatched_kl_pairs(tokenizer):
    records, _ = preference_records_from_dicts(unpaired_rows(), paired=False)
    batches = list(make_unpaired(tokenizer, records, num_epochs=1))
    seen = []
    for batch in batches:
        width = batch["tokens"].shape[1]
        assert width in BOUNDARIES
        for key in ("tokens", "kl_tokens", "sequence_index", "kl_sequence_index"):
            assert batch[key].shape == (4, width) and batch[key].dtype == np.int32
        assert batch["label"].dtype == np.float32
        for p in np.nonzero(batch["pair_mask"])[0]:
            i = int(batch["example_index"][p])
            seen.append(i)
            record, partner = records[i], records[(i + 1) % len(records)]
            assert batch["label"][p] == float(record["label"])
            for prefix, prompt in (("", record["prompt"]), ("kl_", partner["prompt"])):
                tokens, mask, _ = sequence(batch, p, prefix)
                np.testing.assert_array_equal(
                    tokens[mask == 0], [tokenizer.bos_id] + tokenizer.encode(prompt))
                np.testing.assert_array_equal(
                    tokens[mask == 1],
                    tokenizer.encode(record["completion"]) + [tokenizer.eos_id])
        filler = batch["pair_mask"] == 0
        assert (batch["label"][filler] == 0).all()
        assert (batch["kl_segment_ids"][filler] == 0).all()
    assert sorted(seen) == list(range(len(records)))
    # A KL pair borrows the prompt of the next valid record.
    rows = unpaired_rows(4)
    rows[2]["label"] = "maybe"
    report = SkipReport()
    batch = next(iter(make_unpaired(tokenizer, rows, shuffle=False, num_epochs=1,
                                    on_bad_row="skip", skip_report=report)))
    assert dict(report.counts) == {"wrong_type": 1}
    np.testing.assert_array_equal(batch["example_index"], [0, 1, 3, -1])
    tokens, mask, _ = sequence(batch, 1, "kl_")
    np.testing.assert_array_equal(tokens[mask == 0][1:], tokenizer.encode(rows[3]["prompt"]))
    with pytest.raises(ValueError, match="packing"):
        make_unpaired(tokenizer, records, packing=True)


@pytest.mark.parametrize("paired", [True, False])
def test_reference_logps_are_carried_by_example_index(tokenizer, paired):
    rows = pair_rows(6) if paired else unpaired_rows(6)
    fields = (("ref_chosen_logps", "ref_rejected_logps") if paired
              else ("ref_logps", "ref_kl_logps"))
    for i, row in enumerate(rows):
        row[fields[0]], row[fields[1]] = -1.5 * i, -0.25 * i - 3
    records, _ = preference_records_from_dicts(rows, paired=paired)
    build = make if paired else make_unpaired
    batches = list(build(tokenizer, records, num_epochs=1))
    for batch in batches:
        for field in fields:
            assert batch[field].dtype == np.float32 and batch[field].shape == (4,)
            real = batch["example_index"] >= 0
            expected = [records[i][field] for i in batch["example_index"][real]]
            np.testing.assert_allclose(batch[field][real], expected)
            assert (batch[field][~real] == 0).all()
    assert sum(b["pair_mask"].sum() for b in batches) == 6
    # Once any record carries them, every record must.
    del records[3][fields[1]]
    with pytest.raises(DataError, match=rf"records\[3\]: field '{fields[1]}' is missing"):
        list(build(tokenizer, records, num_epochs=1))
    assert "ref_logps" not in next(iter(make_unpaired(
        tokenizer, preference_records_from_dicts(unpaired_rows(), paired=False)[0])))


def batches_equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["padded", "packed", "unpaired"])
def test_iterator_state_round_trip(tokenizer, kind):
    if kind == "unpaired":
        records, _ = preference_records_from_dicts(unpaired_rows(), paired=False)
        ds = make_unpaired(tokenizer, records, num_epochs=3)
    else:
        records, _ = preference_records_from_dicts(pair_rows())
        # Two packed rows hold fewer than 4 pairs, so pairs wait for the next batch.
        ds = make(tokenizer, records, num_epochs=3, packing=kind == "packed",
                  packed_rows=2 if kind == "packed" else None)
    carried_over = False
    for taken in (1, 4, 7):
        it = iter(ds)
        for _ in range(taken):
            last = next(it)
        carried_over |= last["pair_mask"].sum() < 4
        state = it.get_state()
        expected = list(itertools.islice(it, 5))
        resumed = iter(ds)
        resumed.set_state(state)
        assert all(batches_equal(a, b) for a, b in
                   zip(expected, itertools.islice(resumed, 5), strict=True))
    assert carried_over == (kind == "packed")


def test_seed_determines_batches_and_shards_are_disjoint(tokenizer):
    records, _ = preference_records_from_dicts(pair_rows())

    def order(**kwargs):
        return [i for b in make(tokenizer, records, num_epochs=1, **kwargs)
                for i in b["example_index"] if i >= 0]

    assert order(seed=3) == order(seed=3) != order(seed=4)
    shards = [order(shard_index=i, shard_count=2) for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(len(records)))


def test_builtin_task_data_validates_and_tokenises(tokenizer):
    task = get_task("sort")
    pairs = task.preference_pairs(64, seed=0)
    records, report = records_from_dicts(pairs, required_fields=("prompt", "chosen",
                                                                 "rejected"))
    assert report.total == 0
    for record in records:
        tokenize_preference_pair(record["prompt"], record["chosen"], record["rejected"],
                                 tokenizer, max_length=64)
    records, _ = preference_records_from_dicts(pairs)
    n = sum(b["pair_mask"].sum() for b in make(tokenizer, records, max_length=64,
                                                num_epochs=1, packing=True))
    assert n == 64
    unpaired, _ = preference_records_from_dicts(task.unpaired(32, seed=0), paired=False)
    n = sum(b["pair_mask"].sum() for b in make_unpaired(tokenizer, unpaired,
                                                         max_length=64, num_epochs=1))
    assert n == 32


def _chat_pair(role, i):
    return {"prompt": [{"role": role, "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": f"C{i}"}],
            "rejected": [{"role": "assistant", "content": f"R{i}"}]}


def test_pairs_that_do_not_tokenise_are_counted_at_setup_or_raise_with_file_line(
        role_checking_tokenizer, tmp_path):
    """A run's records are checked once against the tokenizer, in the file's SkipReport;
    the kept ones are renumbered and every later dataset over them skips nothing."""
    tokenizer = role_checking_tokenizer
    rows = pair_rows(6)
    rows[1] = {**rows[1], "prompt": "x" * 40}      # line 2: prompt fills max_length
    rows[2] = {**rows[2], "rejected": rows[2]["chosen"]}  # line 3: file-level skip
    rows[4] = _chat_pair("wizard", 4)             # line 5: the template raises
    rows[5] = _chat_pair("user", 5)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    records, report = load_preference_records(str(path), on_bad_row="skip")
    kept = tokenizable_preference_records(records, tokenizer, max_length=MAX_LENGTH,
                                          on_bad_row="skip", skip_report=report)
    assert dict(report.counts) == {"chosen_equals_rejected": 1, "prompt_too_long": 1,
                                   "chat_template": 1}
    summary = report.summary()
    assert summary.startswith("skipped 3 rows (chat_template: 1, chosen_equals_rejected: 1, "
                              "prompt_too_long: 1); first examples:")
    assert f"{path}:2: prompt is 41 tokens (with BOS)" in summary
    assert f"{path}:5: chat template failed: TemplateError: unknown role wizard" in summary
    assert [r["_origin"] for r in kept] == [f"{path}:{line}" for line in (1, 4, 6)]
    assert [r["_index"] for r in kept] == [0, 1, 2]

    for packing in (False, True):
        again = SkipReport()
        batches = list(make(tokenizer, kept, num_epochs=2, packing=packing,
                            on_bad_row="skip", skip_report=again))
        assert again.total == 0
        seen = sorted(int(i) for b in batches for i in b["example_index"] if i >= 0)
        assert seen == [0, 0, 1, 1, 2, 2]
        # Built straight from the loaded records, the dataset drops the same pairs.
        direct = SkipReport()
        batches = list(make(tokenizer, records, num_epochs=1, packing=packing,
                            on_bad_row="skip", skip_report=direct))
        assert dict(direct.counts) == {"prompt_too_long": 1, "chat_template": 1}
        seen = sorted(int(i) for b in batches for i in b["example_index"] if i >= 0)
        assert seen == [records[i]["_index"] for i in (0, 2, 4)]

    with pytest.raises(DataError, match=re.escape(f"{path}:2: prompt is 41 tokens")):
        tokenizable_preference_records(records, tokenizer, max_length=MAX_LENGTH)
    with pytest.raises(DataError, match=re.escape(
            f"{path}:5: chat template failed: TemplateError: unknown role wizard")):
        make(tokenizer, records, max_length=64)
