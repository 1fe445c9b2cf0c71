"""Parsing a source as shards gives the rows of the one-shard parse, and reads it as a stream."""
from __future__ import annotations

import csv
import gzip
import io
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zhlm.data.formats import parse_source, parse_to_parquet, read_records, shard_range
from zhlm.data.schema import merge_stats

N = 60
SHARDS = [2, 3, 7, 16, 200]  # 200: more shards than records, most of them empty


def texts():
    """Records with and without ids, multi-byte text, and some that parse rejects."""
    out = []
    for i in range(N):
        rec = {"text": f"第{i}行：春眠不觉晓，处处闻啼鸟。" * (1 + i % 4)}
        if i % 5 == 0:
            rec["id"] = f"own-{i}"
        if i % 11 == 3:
            rec = {"other": "缺少字段"}      # missing field 'text'
        if i % 13 == 4:
            rec["text"] = "   "              # empty field 'text'
        out.append(rec)
    return out


def jsonl_bytes() -> bytes:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in texts()]
    lines[7] = b'{"text": "broken'                 # bad json
    lines[12] = b'{"text": "\xff\xfe bad"}'        # invalid utf-8
    lines[20] = b"[1, 2]"                          # not an object
    out = [b"", b" \t"]                            # blank lines first, the first after the BOM
    for i, line in enumerate(lines):
        out.append(line)
        out += [b"", b"  "] if i % 9 == 0 else []  # blank and whitespace-only lines
        out += [b""] * 5 if i == 30 else []        # several in a row
    out += [b"", b" "]                             # and last
    body = b"".join(line + (b"\r\n" if k % 3 else b"\n") for k, line in enumerate(out))
    return b"\xef\xbb\xbf" + body.removesuffix(b"\n").removesuffix(b"\r")  # a BOM, no final newline


def physical_lines(data: bytes) -> list[bytes]:
    """The lines of a jsonl or txt file as an editor numbers them, line endings stripped."""
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    return [line.removesuffix(b"\r") for line in (lines[:-1] if lines[-1] == b"" else lines)]


def write_source(tmp_path, fmt: str):
    records = texts()
    if fmt in ("jsonl", "jsonl.gz"):
        path = tmp_path / f"s.{fmt}"
        data = jsonl_bytes()
        path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    elif fmt == "txt":
        path = tmp_path / "s.txt"
        lines = [r.get("text", "").encode() for r in records]  # a record without text: a blank line
        lines[12] = b"\xff bad"
        path.write_bytes(b"\n \r\n" + b"\n\n".join(lines[:30]) + b"\r\n" + b"\n".join(lines[30:]) + b"\n\n\t")
    elif fmt == "json":
        path = tmp_path / "s.json"
        items = [*records[:20], "not a dict", *records[20:], [1, 2], 3.5]
        path.write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8-sig")
    elif fmt == "parquet":
        path = tmp_path / "s.parquet"
        rows = [{"id": r.get("id"), "text": r.get("text")} for r in records]
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    elif fmt == "csv":
        path = tmp_path / "s.csv"
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "text"])
        for i, r in enumerate(records):
            w.writerow([r.get("id", ""), r.get("text", "") + ("\n换行" if i % 6 == 0 else "")])  # quoted newlines
            if i in (0, 30):
                buf.write("\r\n  \r\n")  # blank lines: 4 in all
        data = buf.getvalue().encode()
        path.write_bytes(data.replace("第9行".encode(), b"\xff9", 1) + b"1,too,many\n")
    return path, fmt.removesuffix(".gz")


FORMATS = ["jsonl", "jsonl.gz", "txt", "json", "parquet", "csv"]


def source_lines(path) -> list[bytes]:
    data = path.read_bytes()
    return physical_lines(gzip.decompress(data) if path.suffix == ".gz" else data)


def check_blank_lines(path, fmt, rows, rejects, stats):
    """Blank lines are counted, and in jsonl and txt every line is counted once and a record's
    index (its default id, a reject's index) is its line."""
    if fmt in ("json", "parquet"):
        assert stats["blank_lines_skipped"] == 0
        return
    if fmt == "csv":
        assert stats["blank_lines_skipped"] == 4
        return
    lines = source_lines(path)
    assert stats["blank_lines_skipped"] == sum(1 for line in lines if not line.strip()) > 10
    assert stats["rows_in"] + stats["records_beyond_limit"] + stats["blank_lines_skipped"] == len(lines)
    for i in rejects.column("index").to_pylist():
        assert lines[i].strip()
    for row in rows.to_pylist():
        if row["id"].startswith("s:"):
            line = lines[int(row["id"].removeprefix("s:"))].decode()
            assert (line if fmt == "txt" else json.loads(line)["text"]) == row["text"]


@pytest.mark.parametrize("limit", [None, 25])
@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_concatenate_to_the_one_shard_parse(fmt, limit, tmp_path):
    path, fmt = write_source(tmp_path, fmt)
    whole_rows, whole_rejects, whole_stats = parse_source(path, fmt, source="s", kind="pretrain", limit=limit)
    assert whole_rows.num_rows > 10
    if fmt != "parquet":  # every other test source has malformed records
        assert whole_rejects.num_rows >= (1 if fmt == "txt" else 3)
    check_blank_lines(path, fmt, whole_rows, whole_rejects, whole_stats)
    for n_shards in SHARDS:
        parts = [parse_source(path, fmt, source="s", kind="pretrain", limit=limit, shard=k, n_shards=n_shards)
                 for k in range(n_shards)]
        assert pa.concat_tables([p[0] for p in parts]).equals(whole_rows), n_shards
        assert pa.concat_tables([p[1] for p in parts]).equals(whole_rejects), n_shards
        assert merge_stats([p[2] for p in parts]) == whole_stats


@pytest.mark.parametrize("fmt", FORMATS)
def test_record_indexes_count_in_the_whole_file(fmt, tmp_path):
    path, fmt = write_source(tmp_path, fmt)
    whole = list(read_records(path, fmt))
    numbers = [r.number for r in whole if not r.blank]
    assert numbers == list(range(len(numbers)))  # records are numbered in order, blank lines are not records
    if fmt in ("jsonl", "txt"):  # one item a line, indexed by its line
        assert [r.index for r in whole] == list(range(len(source_lines(path))))
    else:  # indexed by record number
        assert all(r.index == r.number for r in whole)
    for n_shards in (4, 9):
        shards = [list(read_records(path, fmt, shard=k, n_shards=n_shards)) for k in range(n_shards)]
        assert [r for part in shards for r in part] == whole
        if fmt in ("jsonl", "txt") and not str(path).endswith(".gz"):  # byte ranges: each shard has lines
            assert all(shards)


def test_parse_to_parquet_writes_what_parse_source_returns(tmp_path, monkeypatch):
    monkeypatch.setattr("zhlm.data.formats.BATCH_ROWS", 7)  # several row groups
    path, fmt = write_source(tmp_path, "jsonl")
    rows, rejects, stats = parse_source(path, fmt, source="s", kind="pretrain")
    for k in range(3):
        shard = parse_to_parquet(path, fmt, tmp_path / f"{k}.parquet", tmp_path / f"{k}.rejects.parquet",
                                 source="s", kind="pretrain", shard=k, n_shards=3)
        assert shard["rows_kept"] == pq.read_metadata(tmp_path / f"{k}.parquet").num_rows
    assert pq.ParquetFile(tmp_path / "0.parquet").metadata.num_row_groups > 1
    assert pa.concat_tables([pq.read_table(tmp_path / f"{k}.parquet") for k in range(3)]).equals(rows)
    assert pa.concat_tables([pq.read_table(tmp_path / f"{k}.rejects.parquet") for k in range(3)]).equals(rejects)
    assert not list(tmp_path.glob(".*tmp*"))  # temporary files renamed into place


def test_a_failed_parse_leaves_no_output(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"text": "一"}, {"text": ', encoding="utf-8")
    with pytest.raises(ValueError, match="a.json"):
        parse_to_parquet(path, "json", tmp_path / "rows.parquet", tmp_path / "rejects.parquet",
                         source="s", kind="pretrain")
    assert list(tmp_path.iterdir()) == [path]


def test_json_array_is_read_as_a_stream(tmp_path):
    # The first records come before the parser reaches the broken end of the file: json.load
    # would fail before giving any.
    path = tmp_path / "big.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(20000):
            f.write(json.dumps({"text": f"第{i}条：" + "夜来风雨声，花落知多少。" * 20}, ensure_ascii=False) + ",")
        f.write('{"text": ')
    records = read_records(path, "json")
    assert next(records).data["text"].startswith("第0条")
    with pytest.raises(ValueError, match="not valid JSON after 20000 records"):
        list(records)


def test_parsing_a_json_array_holds_a_batch_not_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr("zhlm.data.formats.BATCH_ROWS", 500)
    path = tmp_path / "big.json"
    record = "夜来风雨声，花落知多少。" * 20
    path.write_text(json.dumps([{"text": f"{i}{record}"} for i in range(20000)], ensure_ascii=False),
                    encoding="utf-8")
    size = path.stat().st_size
    assert size > 10_000_000
    tracemalloc.start()
    try:
        stats = parse_to_parquet(path, "json", tmp_path / "r.parquet", tmp_path / "j.parquet",
                                 source="s", kind="pretrain", shard=1, n_shards=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats["rows_kept"] == 10000
    assert peak < size / 10, (peak, size)


def test_bad_shard_fails():
    for shard, n_shards in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="shard"):
            read_records("x.jsonl", "jsonl", shard=shard, n_shards=n_shards)
    assert [shard_range(10, k, 3) for k in range(3)] == [(0, 3), (3, 6), (6, 10)]
