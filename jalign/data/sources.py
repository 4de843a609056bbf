"""Reading training records from JSONL / Parquet files and in-memory lists.

Every record that comes out of this module is a plain `dict` whose required
fields have been validated, plus an `"_origin"` key ("path:line" for JSONL,
"path:row N" for Parquet, "name[i]" for in-memory lists) so later stages
(tokenisation inside the grain pipeline) can name the offending row.

A required field holds either a non-empty string or a conversation: a
non-empty list of `{"role": str, "content": str}` messages. Conversations are
left as-is; the tokenizer's chat template renders them at tokenisation time.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

ORIGIN_KEY = "_origin"
ON_BAD_ROW = ("raise", "skip")


class DataError(ValueError):
    """A problem with the training data; the message names file, row and field.

    Attributes:
        reason: short machine-readable key (e.g. "missing_field"), used by
            `SkipReport` to count skipped rows.
    """

    def __init__(self, message: str, *, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class SkipReport:
    """Rows skipped under `on_bad_row="skip"`, counted by reason.

    Attributes:
        counts: reason key -> number of skipped rows.
        examples: the first `max_examples` messages ("file:line: problem").
        max_examples: how many example messages to keep.
    """

    counts: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)
    max_examples: int = 5

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, error: DataError) -> None:
        self.counts[error.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 rows"
        by_reason = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        lines = [f"skipped {self.total} rows ({by_reason}); first examples:"]
        lines += [f"  {e}" for e in self.examples]
        return "\n".join(lines)


class _FieldError(Exception):
    """Raised by field validation; turned into a DataError once the origin is known."""

    def __init__(self, field: str, problem: str, reason: str):
        super().__init__(problem)
        self.field, self.problem, self.reason = field, problem, reason


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_messages(field: str, messages: list) -> None:
    if not messages:
        raise _FieldError(field, "is empty", "empty_field")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _FieldError(
                field, f"message {i} must be a dict with 'role' and 'content', got "
                f"{_type_name(message)}", "bad_messages")
        for key in ("role", "content"):
            if key not in message:
                raise _FieldError(field, f"message {i} has no '{key}'", "bad_messages")
            if not isinstance(message[key], str):
                raise _FieldError(
                    field, f"message {i} '{key}' must be a string, got "
                    f"{_type_name(message[key])}", "bad_messages")
            if _has_surrogates(message[key]):
                raise _FieldError(field, f"message {i} '{key}' is not valid UTF-8",
                                  "invalid_utf8")


def _check_field(row: Mapping, field: str) -> Any:
    """Validates `row[field]`; returns the (possibly decoded) value."""
    if field not in row or row[field] is None:
        raise _FieldError(field, "is missing", "missing_field")
    value = row[field]
    if isinstance(value, bytes):  # Parquet binary columns.
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _FieldError(field, f"is not valid UTF-8 ({e.reason} at byte "
                              f"{e.start})", "invalid_utf8") from None
    if isinstance(value, str):
        if _has_surrogates(value):
            raise _FieldError(field, "is not valid UTF-8", "invalid_utf8")
        if not value.strip():
            raise _FieldError(field, "is empty", "empty_field")
        return value
    if isinstance(value, (list, tuple)):
        _check_messages(field, list(value))
        return [dict(m) for m in value]
    raise _FieldError(
        field, f"must be a string or a list of messages, got {_type_name(value)}",
        "wrong_type")


def validate_record(row: Any, origin: str,
                    required_fields: Sequence[str]) -> dict:
    """Checks one raw row; returns a new dict with `"_origin"` set.

    Raises:
        DataError: naming `origin` and the first bad field.
    """
    if not isinstance(row, Mapping):
        raise DataError(f"{origin}: expected a JSON object, got {_type_name(row)}",
                        reason="invalid_json")
    record = dict(row)
    for field in required_fields:
        try:
            record[field] = _check_field(row, field)
        except _FieldError as e:
            raise DataError(f"{origin}: field '{e.field}' {e.problem}",
                            reason=e.reason) from None
    record[ORIGIN_KEY] = origin
    return record


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yields (origin, parsed row) per non-blank line; raises DataError per bad line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            origin = f"{path}:{line_no}"
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                bad_utf8 = None
            except UnicodeDecodeError as e:
                # Parse anyway (lone surrogates stand in for bad bytes) so that the
                # error can name the field holding them.
                text = raw.decode("utf-8", errors="surrogateescape")
                bad_utf8 = f"{e.reason} at byte {e.start}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                if bad_utf8:
                    yield origin, DataError(f"{origin}: line is not valid UTF-8 "
                                            f"({bad_utf8})", reason="invalid_utf8")
                else:
                    yield origin, DataError(f"{origin}: line is not valid JSON: {e}",
                                            reason="invalid_json")
                continue
            if bad_utf8 and isinstance(row, dict):
                fields = [k for k, v in row.items()
                          if isinstance(v, str) and _has_surrogates(v)]
                where = f"field '{fields[0]}'" if fields else "line"
                yield origin, DataError(f"{origin}: {where} is not valid UTF-8 "
                                        f"({bad_utf8})", reason="invalid_utf8")
                continue
            yield origin, row


def _parquet_rows(path: str,
                  required_fields: Sequence[str]) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # deferred: a heavy import only Parquet sources need

    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files.
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    columns = parquet_file.schema_arrow.names
    missing = [f for f in required_fields if f not in columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}; "
                        f"the file has columns {columns}", reason="schema")
    row_index = 0
    for batch in parquet_file.iter_batches():
        for row in batch.to_pylist():
            yield f"{path}:row {row_index}", row
            row_index += 1


def _expand_paths(path_or_paths: str | os.PathLike | Sequence) -> list[str]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        path_or_paths = [path_or_paths]
    paths = []
    for p in path_or_paths:
        p = os.fspath(p)
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise DataError(f"{p}: no files match this pattern")
            paths.extend(matches)
        else:
            paths.append(p)
    if not paths:
        raise DataError("load_records: no paths given")
    return paths


def _collect(rows: Iterable[tuple[str, Any]], *, required_fields, on_bad_row,
             report: SkipReport) -> list[dict]:
    records = []
    for origin, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            records.append(validate_record(row, origin, required_fields))
        except DataError as e:
            if on_bad_row == "raise":
                raise
            report.add(e)
    return records


def _check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")


def load_records(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    required_fields: Sequence[str],
    on_bad_row: str = "raise",
) -> tuple[list[dict], SkipReport]:
    """Reads and validates records from `.jsonl` and `.parquet` files.

    Args:
        path_or_paths: a path, a glob pattern, or a sequence of them; files are read
            in the given order (glob matches sorted).
        required_fields: fields every row must have (non-empty string or list of
            {"role", "content"} messages).
        on_bad_row: "raise" stops at the first bad row with a `DataError` naming
            file, line and field; "skip" drops the row and counts it in the report.
            File-level problems (missing file, empty file, Parquet schema without a
            required column) always raise.

    Returns:
        (records, skip_report). Each record is the row's dict plus
        `"_origin": "path:line"` (1-based lines for JSONL, "path:row N" with
        0-based N for Parquet).
    """
    _check_on_bad_row(on_bad_row)
    report = SkipReport()
    records = []
    for path in _expand_paths(path_or_paths):
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found", reason="io")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: file is empty", reason="io")
        if path.endswith(".jsonl"):
            rows = _jsonl_rows(path)
        elif path.endswith(".parquet"):
            rows = _parquet_rows(path, required_fields)
        else:
            raise DataError(f"{path}: unknown file type (expected .jsonl or .parquet)",
                            reason="io")
        before = len(records) + report.total
        records += _collect(rows, required_fields=required_fields,
                            on_bad_row=on_bad_row, report=report)
        if len(records) + report.total == before:
            raise DataError(f"{path}: file has no records", reason="io")
    if not records:
        raise DataError(f"no valid records in {path_or_paths}; {report.summary()}")
    return records, report


def records_from_dicts(
    rows: Sequence[Mapping[str, Any]],
    *,
    required_fields: Sequence[str],
    on_bad_row: str = "raise",
    name: str = "records",
) -> tuple[list[dict], SkipReport]:
    """Validates in-memory rows (built-in tasks) like `load_records` does.

    Each record gets `"_origin": f"{name}[{i}]"` with `i` the index in `rows`.
    """
    _check_on_bad_row(on_bad_row)
    report = SkipReport()
    records = _collect(((f"{name}[{i}]", row) for i, row in enumerate(rows)),
                       required_fields=required_fields, on_bad_row=on_bad_row,
                       report=report)
    if not records:
        raise DataError(f"{name}: no valid records; {report.summary()}")
    return records, report
