"""load_records / records_from_dicts: every bad row is named by file:line and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jalign.data import DataError, load_records, records_from_dicts

FIELDS = ("prompt", "completion")
GOOD = json.dumps({"prompt": "p", "completion": "c"}).encode()

# (bad line, expected message after "file:2: ", SkipReport reason)
BAD_ROWS = [
    (b'{"prompt": "p", "completion": ', "line is not valid JSON: ", "invalid_json"),
    (b'["prompt", "completion"]', "expected a JSON object, got list", "invalid_json"),
    (b'{"prompt": "p"}', "field 'completion' is missing", "missing_field"),
    (b'{"prompt": "p", "completion": null}', "field 'completion' is missing", "missing_field"),
    (b'{"prompt": "p", "completion": ""}', "field 'completion' is empty", "empty_field"),
    (b'{"prompt": "  ", "completion": "c"}', "field 'prompt' is empty", "empty_field"),
    (b'{"prompt": "p", "completion": 7}',
     "field 'completion' must be a string or a list of messages, got int", "wrong_type"),
    (b'{"prompt": "p\xff\xfe", "completion": "c"}', "field 'prompt' is not valid UTF-8",
     "invalid_utf8"),
    (b'{"prompt": [{"role": "user", "content": 3}], "completion": "c"}',
     "field 'prompt' message 0 'content' must be a string, got int", "bad_messages"),
    (b'{"prompt": [{"content": "hi"}], "completion": "c"}',
     "field 'prompt' message 0 has no 'role'", "bad_messages"),
    (b'{"prompt": ["hi"], "completion": "c"}',
     "field 'prompt' message 0 must be a dict with 'role' and 'content', got str",
     "bad_messages"),
    (b'{"prompt": [], "completion": "c"}', "field 'prompt' is empty", "empty_field"),
]


def write_jsonl(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("line,message,reason", BAD_ROWS)
def test_bad_row_raises_with_file_line_and_field(tmp_path, line, message, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, line, GOOD])
    with pytest.raises(DataError) as info:
        load_records(path, required_fields=FIELDS)
    assert str(info.value).startswith(f"{path}:2: {message}")
    assert info.value.reason == reason


def test_skip_mode_counts_each_reason_and_keeps_examples(tmp_path):
    lines = [GOOD] + [line for line, _, _ in BAD_ROWS] + [GOOD]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    records, report = load_records(path, required_fields=FIELDS, on_bad_row="skip")
    assert [r["_origin"] for r in records] == [f"{path}:1", f"{path}:{len(lines)}"]
    expected = {}
    for _, _, reason in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.counts) == expected
    assert report.total == len(BAD_ROWS)
    assert report.examples[0].startswith(f"{path}:2: line is not valid JSON: ")
    assert len(report.examples) == report.max_examples
    summary = report.summary()
    assert f"skipped {len(BAD_ROWS)} rows" in summary and "wrong_type: 1" in summary
    assert f"{path}:3: expected a JSON object" in summary


def test_blank_lines_are_ignored_but_counted_in_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, b"", b"   ", b'{"prompt": "p"}'])
    with pytest.raises(DataError, match=r"a\.jsonl:4: field 'completion' is missing"):
        load_records(path, required_fields=FIELDS)


def test_conversational_fields_are_kept_as_message_lists(tmp_path):
    row = {"prompt": [{"role": "user", "content": "hi"}],
           "completion": [{"role": "assistant", "content": "yo"}], "extra": 1}
    path = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(row).encode()])
    (record,), report = load_records(path, required_fields=FIELDS)
    assert record == {**row, "_origin": f"{path}:1"}
    assert report.total == 0


@pytest.mark.parametrize("content,message", [
    (b"", "file is empty"),
    (b"\n\n", "file has no records"),
])
def test_empty_file(tmp_path, content, message):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"empty.jsonl: {message}"):
        load_records(str(path), required_fields=FIELDS)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_records(str(tmp_path / "nope.jsonl"), required_fields=FIELDS)
    with pytest.raises(DataError, match=r"no files match"):
        load_records(str(tmp_path / "*.jsonl"), required_fields=FIELDS)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unknown file type"):
        load_records(str(tmp_path / "x.csv"), required_fields=FIELDS)


def test_all_rows_skipped_raises(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [b'{"prompt": "p"}'])
    with pytest.raises(DataError, match="no valid records.*missing_field: 1"):
        load_records(path, required_fields=FIELDS, on_bad_row="skip")


def test_parquet_wrong_schema_names_file_column_and_columns(tmp_path):
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.table({"prompt": ["p"], "answer": ["a"]}), path)
    with pytest.raises(DataError) as info:
        load_records(path, required_fields=FIELDS)
    message = str(info.value)
    assert message.startswith(f"{path}: missing required column(s) ['completion']")
    assert "['prompt', 'answer']" in message


def test_parquet_rows_are_validated_by_row_index(tmp_path):
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.table({"prompt": ["p0", "p1", "p2"],
                             "completion": ["c0", None, ""]}), path)
    with pytest.raises(DataError, match=r"train\.parquet:row 1: field 'completion' is missing"):
        load_records(path, required_fields=FIELDS)
    records, report = load_records(path, required_fields=FIELDS, on_bad_row="skip")
    assert records == [{"prompt": "p0", "completion": "c0", "_origin": f"{path}:row 0"}]
    assert dict(report.counts) == {"missing_field": 1, "empty_field": 1}


def test_parquet_conversations_and_several_files_in_order(tmp_path):
    chat = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({
        "prompt": [[{"role": "user", "content": "hi"}]],
        "completion": [[{"role": "assistant", "content": "yo"}]]}), chat)
    plain = write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD])
    records, _ = load_records([plain, chat], required_fields=FIELDS)
    assert [r["_origin"] for r in records] == [f"{plain}:1", f"{plain}:2", f"{chat}:row 0"]
    assert records[2]["prompt"] == [{"role": "user", "content": "hi"}]
    globbed, _ = load_records(str(tmp_path / "*.jsonl"), required_fields=FIELDS)
    assert len(globbed) == 2


def test_records_from_dicts():
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 1}]
    with pytest.raises(DataError, match=r"toy\[1\]: field 'completion' must be a string"):
        records_from_dicts(rows, required_fields=FIELDS, name="toy")
    records, report = records_from_dicts(rows, required_fields=FIELDS, on_bad_row="skip",
                                         name="toy")
    assert records == [{"prompt": "p", "completion": "c", "_origin": "toy[0]"}]
    assert report.counts == {"wrong_type": 1}
    assert rows[0] == {"prompt": "p", "completion": "c"}  # input not mutated
