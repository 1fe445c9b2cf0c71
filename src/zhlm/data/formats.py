"""Read source files (jsonl, json, parquet, csv, txt) into the unified row schemas.

A bad record never stops a source: it becomes a reject with a reason, so that
rows in = rows kept + rows rejected holds for every source.
"""
from __future__ import annotations

import csv
import functools
import gzip
import json
import os
import re
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zhlm.data.schema import KIND_FIELDS, SFT_OPTIONAL, rejects_table, rows_table

FORMATS = ("jsonl", "json", "parquet", "csv", "txt")
RAW_MAX = 2000           # characters of a rejected record kept for inspection
BATCH_ROWS = 65536       # rows buffered as dicts before they become an Arrow table
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"

# Corpus text fields easily exceed csv's default 128 KiB field limit.
csv.field_size_limit(2**31 - 1)


@dataclass
class Record:
    index: int                 # 0-based record number (blank lines are not records)
    data: dict | None          # the parsed record, None when rejected
    error: str | None = None   # why the record could not be read
    raw: str | None = None     # the raw text of a rejected record, truncated


class MissingField(KeyError):
    """A template names a field the record does not have."""

    def __init__(self, field: str):
        super().__init__(field)
        self.field = field

    def __str__(self) -> str:
        return f"missing field '{self.field}'"


def _open(path, mode: str = "rb", **kw):
    """Open a file, decompressing .gz transparently."""
    opener = gzip.open if str(path).endswith(".gz") else open
    return opener(path, mode, **kw)


def _raw(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    return data.rstrip("\r\n")[:RAW_MAX]


def _lines(path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines as bytes, numbered from 0, BOM and line ending stripped."""
    index = 0
    with _open(path) as f:
        for n, line in enumerate(f):
            if n == 0 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if not line.strip():
                continue
            yield index, line.rstrip(b"\r\n")
            index += 1


def _read_jsonl(path) -> Iterator[Record]:
    for index, line in _lines(path):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield Record(index, None, "invalid utf-8", _raw(line))
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            yield Record(index, None, "bad json", _raw(text))
            continue
        if isinstance(obj, dict):
            yield Record(index, obj)
        else:
            yield Record(index, None, "not an object", _raw(text))


def _read_txt(path) -> Iterator[Record]:
    for index, line in _lines(path):
        try:
            yield Record(index, {"text": line.decode("utf-8")})
        except UnicodeDecodeError:
            yield Record(index, None, "invalid utf-8", _raw(line))


def _read_json(path) -> Iterator[Record]:
    # A JSON array can only be parsed whole.
    try:
        with _open(path, "rt", encoding="utf-8-sig") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:
        hint = " (one object per line? use format jsonl)" if "Extra data" in str(e) else ""
        raise ValueError(f"{path}: not valid JSON: {e}{hint}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: format json needs a top-level array, got {type(data).__name__}")
    for index, obj in enumerate(data):
        if isinstance(obj, dict):
            yield Record(index, obj)
        else:
            yield Record(index, None, "not an object", _raw(json.dumps(obj, ensure_ascii=False)))


def _read_parquet(path) -> Iterator[Record]:
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        for obj in batch.to_pylist():
            yield Record(index, obj)
            index += 1


def _read_csv(path) -> Iterator[Record]:
    # surrogateescape keeps invalid bytes as lone surrogates, so one bad row is
    # detected and rejected instead of the decoder failing the whole file.
    with _open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        header = [_unescape(name) for name in header]
        index = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield Record(index, None, "bad csv row", _raw(str(e)))
                index += 1
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            raw = ",".join(row)
            if _SURROGATE.search(raw):
                yield Record(index, None, "invalid utf-8", _raw(_unescape(raw)))
            elif len(row) != len(header):
                yield Record(index, None, "bad csv row", _raw(raw))
            else:
                yield Record(index, dict(zip(header, row)))
            index += 1


def _unescape(s: str) -> str:
    """Undo surrogateescape, replacing the invalid bytes."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet,
            "csv": _read_csv, "txt": _read_txt}


def read_records(path: str | os.PathLike, fmt: str) -> Iterator[Record]:
    """Stream the records of a file; unreadable records come back with `error` set."""
    if fmt not in _READERS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    return _READERS[fmt](Path(path))


@functools.lru_cache(maxsize=256)
def _parse_template(template: str) -> tuple:
    parts = tuple(string.Formatter().parse(template))
    for _, name, _, _ in parts:
        if name == "" or (name is not None and name.isdigit()):
            raise ValueError(f"template fields must be named: {template!r}")
    return parts


def _single_field(template: str) -> str | None:
    """The field name when the template is exactly "{name}", else None."""
    parts = _parse_template(template)
    if len(parts) == 1 and parts[0][0] == "" and parts[0][1] and not parts[0][2] and not parts[0][3]:
        return parts[0][1]
    return None


def _to_str(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def render_template(template: str, record: dict) -> str:
    """Fill a str.format-style template from `record`; a missing key raises MissingField."""
    out = []
    for literal, name, spec, conversion in _parse_template(template):
        out.append(literal)
        if name is None:
            continue
        if name not in record:
            raise MissingField(name)
        value = record[name]
        text = _to_str(value)
        if conversion:
            text = string.Formatter().convert_field(text, conversion)
        if spec:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and not conversion
            text = format(value if numeric else text, spec)
        out.append(text)
    return "".join(out)


def _history(value) -> str | None:
    """Earlier turns as JSON; [[user, assistant], ...] pairs become role/content messages."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, list) and all(isinstance(t, (list, tuple)) and len(t) == 2 for t in value):
        value = [{"role": role, "content": text}
                 for pair in value for role, text in zip(("user", "assistant"), pair)]
    return _to_str(value)


class _Reject(Exception):
    pass


class _TableBuilder:
    """Buffer dict rows and turn them into Arrow tables batch by batch."""

    def __init__(self, to_table):
        self.to_table, self.buf, self.tables = to_table, [], []

    def add(self, row: dict) -> None:
        self.buf.append(row)
        if len(self.buf) >= BATCH_ROWS:
            self.tables.append(self.to_table(self.buf))
            self.buf = []

    def table(self) -> pa.Table:
        if self.buf or not self.tables:
            self.tables.append(self.to_table(self.buf))
            self.buf = []
        return pa.concat_tables(self.tables)


def _clean(s: str | None) -> str | None:
    """Lone surrogates (from JSON \\ud800 escapes) cannot be stored in Arrow; replace them."""
    if s is None or not _SURROGATE.search(s):
        return s
    return s.encode("utf-8", "replace").decode("utf-8")


def parse_source(path: str | os.PathLike, fmt: str, *, source: str, kind: str,
                 templates: dict[str, str] | None = None, id_template: str | None = None,
                 limit: int | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """Parse one source file into (rows, rejects, stats) for its kind."""
    if kind not in KIND_FIELDS:
        raise ValueError(f"unknown kind {kind!r}; supported: {', '.join(KIND_FIELDS)}")
    templates = dict(templates or {})
    optional = SFT_OPTIONAL if kind == "sft" else ()
    unknown = set(templates) - set(KIND_FIELDS[kind]) - set(optional)
    if unknown:
        raise ValueError(f"templates for unknown {kind} fields: {sorted(unknown)}; "
                         f"allowed: {list(KIND_FIELDS[kind]) + list(optional)}")
    required = [(f, templates.get(f, "{" + f + "}")) for f in KIND_FIELDS[kind]]

    rows = _TableBuilder(lambda batch: rows_table(batch, kind))
    rejects = _TableBuilder(rejects_table)
    reasons: Counter = Counter()
    rows_in = beyond = 0

    def reject(index, id_, reason, content):
        reasons[reason] += 1
        rejects.add({"source": source, "index": index, "id": _clean(id_), "reason": reason,
                     "content": _clean(content)})

    for rec in read_records(path, fmt):
        if limit is not None and rows_in >= limit:
            beyond += 1
            continue
        rows_in += 1
        if rec.error:
            reject(rec.index, None, rec.error, rec.raw)
            continue
        data, id_ = rec.data, None
        try:
            if id_template is not None:
                id_ = render_template(id_template, data)
            elif data.get("id") is not None:
                id_ = _to_str(data["id"])
            else:
                id_ = f"{source}:{rec.index}"
            row = {"id": id_, "source": source}
            for field, template in required:
                value = render_template(template, data)
                if not value.strip():
                    raise _Reject(f"empty field '{field}'")
                row[field] = value
            for field in optional:
                # Optional fields are null rather than a reject when the record lacks them.
                template = templates.get(field)
                name = _single_field(template) if template else field
                if name is not None:  # take the value itself, so a history list stays a list
                    value = data.get(name)
                    value = _history(value) if field == "history" else (_to_str(value) or None)
                else:
                    try:
                        value = render_template(template, data) or None
                    except MissingField:
                        value = None
                row[field] = value
            if any(_SURROGATE.search(v) for v in row.values() if v):
                raise _Reject("invalid utf-8")  # valid bytes, but a \ud800-style escape
        except (MissingField, _Reject) as e:
            content = json.dumps(data, ensure_ascii=False, default=str)[:RAW_MAX]
            reject(rec.index, id_, str(e), content)
            continue
        rows.add(row)

    kept = rows_in - sum(reasons.values())
    stats = {"source": source, "kind": kind, "rows_in": rows_in, "rows_kept": kept,
             "rows_rejected": rows_in - kept, "reasons": dict(reasons),
             "records_beyond_limit": beyond}
    return rows.table(), rejects.table(), stats
