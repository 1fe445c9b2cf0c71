"""Read source files (jsonl, json, parquet, csv, txt, and .gz) into the unified row schemas.

Files are read as streams and written as they are read, so memory holds one batch of rows,
never the file; a source can be parsed as several shards that concatenate to the whole.

A bad record never stops a source: it becomes a reject with a reason, so that
rows in = rows kept + rows rejected holds for every source. A blank line (nothing but ASCII
whitespace) is no record: it is counted in the stats as a skipped blank line, so that every
line of a jsonl or txt file is a row in, a record beyond the limit or a blank line.

Where a record is (its `index`, 0-based) makes the default id SOURCE:INDEX and a reject's
index. In jsonl and txt it is the physical line, blank lines included, so index i is line
i + 1 in an editor. In json, parquet and csv it is the record number: a csv's header, its
blank lines and the newlines inside its quoted fields are not counted.
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

import ijson
import pyarrow as pa
import pyarrow.parquet as pq

from zhlm.data.schema import KIND_FIELDS, REJECT_SCHEMA, SFT_OPTIONAL, rejects_table, row_schema, rows_table
from zhlm.io import parquet_writer

FORMATS = ("jsonl", "json", "parquet", "csv", "txt")
RAW_MAX = 2000           # characters of a rejected record kept for inspection
BATCH_ROWS = 65536       # rows buffered as dicts before they become an Arrow table (a row group)
BATCH_CHARS = 1 << 23    # ... or fewer rows, when their text reaches this many characters (8M)
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"

# Corpus text fields easily exceed csv's default 128 KiB field limit.
csv.field_size_limit(2**31 - 1)


@dataclass
class Record:
    """One record of a source, or one blank line of it (`blank`: no data and no error)."""
    index: int                 # where it is, 0-based: the line in jsonl and txt, else the record number
    number: int                # 0-based record number, the count `limit` uses (a blank line: records before it)
    data: dict | None          # the parsed record, None when rejected or blank
    error: str | None = None   # why the record could not be read
    raw: str | None = None     # the raw text of a rejected record, truncated
    blank: bool = False        # a blank line, skipped and counted


class MissingField(KeyError):
    """A template names a field the record does not have."""

    def __init__(self, field: str):
        super().__init__(field)
        self.field = field

    def __str__(self) -> str:
        return f"missing field '{self.field}'"


def _open(path, mode: str = "rb", **kw):
    """Open a file, decompressing .gz transparently."""
    opener = gzip.open if _gzipped(path) else open
    return opener(path, mode, **kw)


def _gzipped(path) -> bool:
    return str(path).endswith(".gz")


def _raw(data: bytes | str) -> str:
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    return data.rstrip("\r\n")[:RAW_MAX]


def shard_range(n: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Contiguous [start, stop) of shard `shard` of `n_shards` over n items (records, bytes or
    row groups); the shards cover every item once, and their sizes differ by at most one."""
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard must be in [0, {n_shards}), got {shard} (n_shards={n_shards})")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n * shard // n_shards, n * (shard + 1) // n_shards


def _file_lines(f, start: int, stop: int | None) -> Iterator[bytes | None]:
    """The lines of binary file `f` that start in [start, stop) (`start` is a line start),
    BOM and line ending stripped, None for a blank line; stop None reads to the end."""
    f.seek(start)
    pos = start
    for line in f:
        if stop is not None and pos >= stop:
            return
        at_start, pos = pos == 0, pos + len(line)
        if at_start and line.startswith(_BOM):
            line = line[len(_BOM):]
        yield line.rstrip(b"\r\n") if line.strip() else None


def _line_start(f, pos: int) -> int:
    """The first line start at or after byte `pos`."""
    if pos == 0:
        return 0
    f.seek(pos - 1)
    f.readline()  # the rest of the line holding byte pos - 1
    return f.tell()


def _lines(path, shard: int = 0, n_shards: int = 1) -> Iterator[tuple[int, int, bytes | None]]:
    """Each line as (line index, record number, bytes or None when blank), both counted from 0
    in the whole file, BOM and line ending stripped; a blank line has the number of the records
    before it. A shard owns the lines that start in its byte range; the counts at its first line
    come from a streamed pass over the bytes before the range."""
    with _open(path) as f:
        start, stop, index, number = 0, None, 0, 0
        if n_shards > 1:
            lo, hi = shard_range(os.fstat(f.fileno()).st_size, shard, n_shards)
            start, stop = _line_start(f, lo), _line_start(f, hi)
            for line in _file_lines(f, 0, start):
                index, number = index + 1, number + (line is not None)
        for line in _file_lines(f, start, stop):
            yield index, number, line
            index, number = index + 1, number + (line is not None)


def _blank(index: int, number: int) -> Record:
    return Record(index, number, None, blank=True)


def _record_range(read, shard: int, n_shards: int) -> Iterator[Record]:
    """Shard by position in the stream (records and blank lines alike) a file that cannot be
    cut by bytes (a JSON array, csv, .gz): one streamed pass counts what `read` yields, a
    second keeps the shard's contiguous range and stops after it. Memory stays one record;
    the cost is reading the file up to twice."""
    total = sum(1 for _ in read())
    lo, hi = shard_range(total, shard, n_shards)
    for pos, rec in enumerate(read()):
        if pos >= hi:
            return
        if pos >= lo:
            yield rec


def _read_jsonl(path, shard: int = 0, n_shards: int = 1) -> Iterator[Record]:
    for index, number, line in _lines(path, shard, n_shards):
        if line is None:
            yield _blank(index, number)
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield Record(index, number, None, "invalid utf-8", _raw(line))
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            yield Record(index, number, None, "bad json", _raw(text))
            continue
        if isinstance(obj, dict):
            yield Record(index, number, obj)
        else:
            yield Record(index, number, None, "not an object", _raw(text))


def _read_txt(path, shard: int = 0, n_shards: int = 1) -> Iterator[Record]:
    # One line is one record.
    for index, number, line in _lines(path, shard, n_shards):
        if line is None:
            yield _blank(index, number)
            continue
        try:
            yield Record(index, number, {"text": line.decode("utf-8")})
        except UnicodeDecodeError:
            yield Record(index, number, None, "invalid utf-8", _raw(line))


_JSON_TYPES = {b"{": "an object", b'"': "a string", b"[": "an array"}


def _read_json(path) -> Iterator[Record]:
    # The array is parsed incrementally (ijson): one element in memory at a time. It cannot
    # be cut by bytes, so a shard keeps its element range (read_records, _record_range).
    with _open(path) as f:
        if f.peek(len(_BOM)).startswith(_BOM):
            f.read(len(_BOM))
        first = f.peek(1 << 16).lstrip()[:1]
        if first and first != b"[":
            hint = " (one object per line? use format jsonl)" if first == b"{" else ""
            raise ValueError(f"{path}: format json needs a top-level array, got "
                             f"{_JSON_TYPES.get(first, 'a scalar')}{hint}")
        index = 0
        try:
            for obj in ijson.items(f, "item", use_float=True):
                if isinstance(obj, dict):
                    yield Record(index, index, obj)
                else:
                    yield Record(index, index, None, "not an object",
                                 _raw(json.dumps(obj, ensure_ascii=False)))
                index += 1
        except ijson.JSONError as e:
            message = e.args[0] if e.args else e
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            what = "not valid UTF-8" if "UTF8" in str(message) else "not valid JSON"
            raise ValueError(f"{path}: {what} after {index} records: {message}") from None


def _read_parquet(path, shard: int = 0, n_shards: int = 1) -> Iterator[Record]:
    # A shard reads a contiguous range of row groups (a file of one row group is one shard's).
    f = pq.ParquetFile(path)
    lo, hi = shard_range(f.num_row_groups, shard, n_shards)
    index = sum(f.metadata.row_group(g).num_rows for g in range(lo))
    if lo == hi:
        return
    for batch in f.iter_batches(batch_size=8192, row_groups=range(lo, hi)):
        for obj in batch.to_pylist():
            yield Record(index, index, obj)
            index += 1


def _read_csv(path) -> Iterator[Record]:
    # Quoted fields may hold newlines, so a byte offset is no row boundary: a shard keeps
    # its record range (read_records, _record_range).
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
                yield Record(index, index, None, "bad csv row", _raw(str(e)))
                index += 1
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                yield _blank(index, index)  # no record, so it takes no record number
                continue
            raw = ",".join(row)
            if _SURROGATE.search(raw):
                yield Record(index, index, None, "invalid utf-8", _raw(_unescape(raw)))
            elif len(row) != len(header):
                yield Record(index, index, None, "bad csv row", _raw(raw))
            else:
                yield Record(index, index, dict(zip(header, row)))
            index += 1


def _unescape(s: str) -> str:
    """Undo surrogateescape, replacing the invalid bytes."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet,
            "csv": _read_csv, "txt": _read_txt}


def read_records(path: str | os.PathLike, fmt: str, *, shard: int = 0, n_shards: int = 1) -> Iterator[Record]:
    """Stream the records of a file, or of shard `shard` of `n_shards`; unreadable records come
    back with `error` set, and blank lines (jsonl, txt, csv) with `blank` set, so that they can
    be counted. Indexes and numbers count in the whole file, whichever the shard, and the shards
    in order give the records and blank lines of the whole file in order."""
    if fmt not in _READERS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    shard_range(0, shard, n_shards)  # checks the shard
    path, read = Path(path), _READERS[fmt]
    if n_shards == 1:
        return read(path)
    if fmt == "parquet" or (fmt in ("jsonl", "txt") and not _gzipped(path)):
        return read(path, shard, n_shards)  # row-group or byte ranges
    return _record_range(lambda: read(path), shard, n_shards)  # not seekable: record ranges


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


class _Batches:
    """Buffer dict rows and hand them to `write` as Arrow tables of at most BATCH_ROWS rows
    (or about BATCH_CHARS characters), so memory holds one batch, never the source."""

    def __init__(self, to_table, write):
        self.to_table, self.write, self.buf, self.chars = to_table, write, [], 0

    def add(self, row: dict) -> None:
        self.buf.append(row)
        self.chars += sum(len(v) for v in row.values() if isinstance(v, str))
        if len(self.buf) >= BATCH_ROWS or self.chars >= BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.write(self.to_table(self.buf))
            self.buf, self.chars = [], 0


def _clean(s: str | None) -> str | None:
    """Lone surrogates (from JSON \\ud800 escapes) cannot be stored in Arrow; replace them."""
    if s is None or not _SURROGATE.search(s):
        return s
    return s.encode("utf-8", "replace").decode("utf-8")


def _check_templates(kind: str, templates: dict[str, str] | None) -> dict[str, str]:
    if kind not in KIND_FIELDS:
        raise ValueError(f"unknown kind {kind!r}; supported: {', '.join(KIND_FIELDS)}")
    templates = dict(templates or {})
    optional = SFT_OPTIONAL if kind == "sft" else ()
    unknown = set(templates) - set(KIND_FIELDS[kind]) - set(optional)
    if unknown:
        raise ValueError(f"templates for unknown {kind} fields: {sorted(unknown)}; "
                         f"allowed: {list(KIND_FIELDS[kind]) + list(optional)}")
    return templates


def _parse(records: Iterator[Record], write_rows, write_rejects, *, source: str, kind: str,
           templates: dict[str, str], id_template: str | None, limit: int | None) -> dict:
    """Turn records into rows and rejects, handed to the writers batch by batch; return the stats."""
    optional = SFT_OPTIONAL if kind == "sft" else ()
    required = [(f, templates.get(f, "{" + f + "}")) for f in KIND_FIELDS[kind]]
    rows = _Batches(lambda batch: rows_table(batch, kind), write_rows)
    rejects = _Batches(rejects_table, write_rejects)
    reasons: Counter = Counter()
    rows_in = beyond = blank = 0

    def reject(index, id_, reason, content):
        reasons[reason] += 1
        rejects.add({"source": source, "index": index, "id": _clean(id_), "reason": reason,
                     "content": _clean(content)})

    for rec in records:
        if rec.blank:  # counted wherever it is, before or beyond the limit
            blank += 1
            continue
        if limit is not None and rec.number >= limit:  # the first `limit` records of the whole source
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
             "records_beyond_limit": beyond, "blank_lines_skipped": blank}
    rows.flush()
    rejects.flush()
    return stats


def parse_source(path: str | os.PathLike, fmt: str, *, source: str, kind: str,
                 templates: dict[str, str] | None = None, id_template: str | None = None,
                 limit: int | None = None, shard: int = 0, n_shards: int = 1) -> tuple[pa.Table, pa.Table, dict]:
    """Parse one source file (or shard `shard` of `n_shards` of it) into in-memory
    (rows, rejects, stats) for its kind; `parse_to_parquet` streams to files instead."""
    templates = _check_templates(kind, templates)
    rows, rejects = [rows_table([], kind)], [rejects_table([])]
    stats = _parse(read_records(path, fmt, shard=shard, n_shards=n_shards), rows.append, rejects.append,
                   source=source, kind=kind, templates=templates, id_template=id_template, limit=limit)
    return pa.concat_tables(rows), pa.concat_tables(rejects), stats


def parse_to_parquet(path: str | os.PathLike, fmt: str, rows_path: str | os.PathLike,
                     rejects_path: str | os.PathLike, *, source: str, kind: str,
                     templates: dict[str, str] | None = None, id_template: str | None = None,
                     limit: int | None = None, shard: int = 0, n_shards: int = 1) -> dict:
    """Parse one source file, or shard `shard` of `n_shards` of it, as a stream: rows and
    rejects are written as parquet row groups as they come. Returns the stats.

    Ids and reject indexes are those of the unsharded parse (indexes count in the whole
    file), and `limit` keeps the first records of the whole file (blank lines are not
    records), so the shards in order concatenate to the one-shard output.
    """
    templates = _check_templates(kind, templates)
    records = read_records(path, fmt, shard=shard, n_shards=n_shards)
    with parquet_writer(rows_path, row_schema(kind)) as rows, parquet_writer(rejects_path, REJECT_SCHEMA) as rejects:
        return _parse(records, rows.write_table, rejects.write_table, source=source, kind=kind,
                      templates=templates, id_template=id_template, limit=limit)
