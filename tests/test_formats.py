"""Reading every source format into rows, and rejecting bad records with a reason."""
from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zhlm.data.formats import MissingField, Record, parse_source, read_records, render_template
from zhlm.data.schema import REJECT_SCHEMA, row_schema

RECORDS = [
    {"id": "a", "text": "春眠不觉晓"},
    {"id": "b", "text": "处处闻啼鸟"},
    {"id": "c", "text": "夜来风雨声，花落知多少"},
]


def write(path, fmt, records):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                        encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    elif fmt == "txt":
        path.write_text("".join(r["text"] + "\n" for r in records), encoding="utf-8")
    return path


def check_counts(stats, rows, rejects):
    assert stats["rows_in"] == stats["rows_kept"] + stats["rows_rejected"]
    assert stats["rows_kept"] == rows.num_rows
    assert stats["rows_rejected"] == rejects.num_rows == sum(stats["reasons"].values())
    assert rejects.schema == REJECT_SCHEMA


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "txt"])
def test_round_trip(fmt, tmp_path):
    path = write(tmp_path / f"src.{fmt}", fmt, RECORDS)
    rows, rejects, stats = parse_source(path, fmt, source="poems", kind="pretrain")
    check_counts(stats, rows, rejects)
    assert rows.schema == row_schema("pretrain")
    assert rows.column("text").to_pylist() == [r["text"] for r in RECORDS]
    assert rows.column("source").to_pylist() == ["poems"] * 3
    # txt has no ids: they fall back to source:index.
    ids = ["poems:0", "poems:1", "poems:2"] if fmt == "txt" else ["a", "b", "c"]
    assert rows.column("id").to_pylist() == ids
    assert stats == {"source": "poems", "kind": "pretrain", "rows_in": 3, "rows_kept": 3,
                     "rows_rejected": 0, "reasons": {}, "records_beyond_limit": 0,
                     "blank_lines_skipped": 0}


def test_gzip(tmp_path):
    path = tmp_path / "src.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS))
    rows, _, _ = parse_source(path, "jsonl", source="s", kind="pretrain")
    assert rows.column("text").to_pylist() == [r["text"] for r in RECORDS]


def test_jsonl_rejects(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        '{"text": "好的"}\n'.encode()        # 0 kept
        + b"\n   \n"                          # 1, 2 blank: not records, but lines
        + b'{"text": "broken\n'               # 3 bad json
        + b'{"text": "\xff\xfe bad"}\n'       # 4 invalid utf-8
        + b"[1, 2]\n"                          # 5 not an object
        + b'{"other": "x"}\n'                 # 6 missing field
        + b'{"text": "  \\n "}\n'     # 7 empty field
        + '{"text": "最后一行"}'.encode()      # 8 kept, no final newline
    )
    rows, rejects, stats = parse_source(path, "jsonl", source="s", kind="pretrain")
    check_counts(stats, rows, rejects)
    assert stats["rows_in"] == 7 and stats["blank_lines_skipped"] == 2
    assert rows.column("text").to_pylist() == ["好的", "最后一行"]
    assert rows.column("id").to_pylist() == ["s:0", "s:8"]
    got = {r["index"]: r for r in rejects.to_pylist()}
    assert {i: r["reason"] for i, r in got.items()} == {
        3: "bad json", 4: "invalid utf-8", 5: "not an object",
        6: "missing field 'text'", 7: "empty field 'text'"}
    assert got[3]["content"] == '{"text": "broken'
    assert got[4]["content"].endswith("bad\"}") and "\ufffd" in got[4]["content"]
    assert json.loads(got[6]["content"]) == {"other": "x"}
    assert all(r["source"] == "s" for r in got.values())
    assert stats["reasons"] == {"bad json": 1, "invalid utf-8": 1, "not an object": 1,
                                "missing field 'text'": 1, "empty field 'text'": 1}


def test_jsonl_lone_surrogate_escape(tmp_path):
    # Valid bytes, but "\ud800" decodes to a string that cannot be stored as UTF-8.
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a\\ud800b"}\n{"text": "ok"}\n', encoding="utf-8")
    rows, rejects, stats = parse_source(path, "jsonl", source="s", kind="pretrain")
    check_counts(stats, rows, rejects)
    assert rows.column("text").to_pylist() == ["ok"]
    assert rejects.column("reason").to_pylist() == ["invalid utf-8"]


def test_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "一"}, "not a dict", {"text": ""}]), encoding="utf-8")
    rows, rejects, stats = parse_source(path, "json", source="s", kind="pretrain")
    check_counts(stats, rows, rejects)
    assert rejects.column("reason").to_pylist() == ["not an object", "empty field 'text'"]
    assert rejects.column("index").to_pylist() == [1, 2]


@pytest.mark.parametrize("content", ['{"text": "x"}', '{"text": "x"}\n{"text": "y"}\n', "[1, "])
def test_json_file_level_errors(content, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="a.json"):
        list(read_records(path, "json"))


def test_csv_rejects(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(
        b"id,text\n"
        + "1,你好\n".encode()
        + b"2,too,many\n"                    # 1 bad csv row
        + b"\n"                              # blank: not a record
        + b"3,\xff\xfe\n"                    # 2 invalid utf-8
        + b"4,\n"                            # 3 empty field
        + '5,"多行\n文本, 带逗号"\n'.encode()  # 4 kept: quoted newline and comma
    )
    rows, rejects, stats = parse_source(path, "csv", source="s", kind="pretrain")
    check_counts(stats, rows, rejects)
    assert stats["rows_in"] == 5 and stats["blank_lines_skipped"] == 1
    assert rows.column("text").to_pylist() == ["你好", "多行\n文本, 带逗号"]
    assert rows.column("id").to_pylist() == ["1", "5"]
    # A csv's index is its record number: the header and the blank line are no records.
    assert dict(zip(rejects.column("index").to_pylist(), rejects.column("reason").to_pylist())) == {
        1: "bad csv row", 2: "invalid utf-8", 3: "empty field 'text'"}


def test_txt_rejects(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("第一行\r\n\n".encode() + b"\xff bad\n" + "第四行".encode())
    recs = list(read_records(path, "txt"))
    assert recs[0] == Record(0, 0, {"text": "第一行"})
    assert recs[1] == Record(1, 1, None, blank=True)  # a line, not a record
    assert recs[2].error == "invalid utf-8" and (recs[2].index, recs[2].number) == (2, 1) and recs[2].data is None
    assert recs[3] == Record(3, 2, {"text": "第四行"})


def test_parquet_non_string_values(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [7, 8], "q": ["几岁", "标签"], "a": [3, None],
                             "tags": [["甲", "乙"], ["丙"]]}), path, row_group_size=1)
    rows, rejects, stats = parse_source(path, "parquet", source="s", kind="sft",
                                        templates={"prompt": "{q}", "response": "{a}|{tags}"})
    check_counts(stats, rows, rejects)
    assert rows.to_pylist()[0]["id"] == "7"
    assert rows.column("response").to_pylist() == ['3|["甲", "乙"]', '|["丙"]']


def test_render_template():
    rec = {"instruction": "翻译", "input": "hello", "n": 3, "x": None, "l": ["一", 2], "d": {"k": "值"}}
    assert render_template("{instruction}\n{input}", rec) == "翻译\nhello"
    assert render_template("{{literal}} {n} [{x}] {l} {d}", rec) == '{literal} 3 [] ["一", 2] {"k": "值"}'
    with pytest.raises(MissingField) as exc:
        render_template("{instruction}{missing}", rec)
    assert exc.value.field == "missing"
    assert isinstance(exc.value, KeyError)


def test_sft_templates_ids_history(tmp_path):
    records = [
        {"instruction": "翻译", "input": "cat", "output": "猫", "key": "k0",
         "history": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]},
        {"instruction": "写诗", "input": "", "output": "床前明月光", "key": "k1",
         "history": [["问", "答"]], "system": "你是诗人"},
        {"instruction": "空", "input": "", "output": "   ", "key": "k2"},
        {"instruction": "缺", "output": "x", "key": "k3"},
    ]
    path = write(tmp_path / "sft.jsonl", "jsonl", records)
    templates = {"prompt": "{instruction}\n{input}", "response": "{output}"}
    rows, rejects, stats = parse_source(path, "jsonl", source="belle", kind="sft",
                                        templates=templates, id_template="belle-{key}")
    check_counts(stats, rows, rejects)
    assert rows.schema == row_schema("sft")
    out = rows.to_pylist()
    assert [r["id"] for r in out] == ["belle-k0", "belle-k1"]
    assert out[0]["prompt"] == "翻译\ncat" and out[1]["prompt"] == "写诗\n"
    assert json.loads(out[0]["history"]) == records[0]["history"]
    assert "你好" in out[0]["history"]  # ensure_ascii=False
    assert json.loads(out[1]["history"]) == [{"role": "user", "content": "问"},
                                             {"role": "assistant", "content": "答"}]
    assert out[0]["system"] is None and out[1]["system"] == "你是诗人"
    assert rejects.to_pylist()[0]["reason"] == "empty field 'response'"
    assert rejects.to_pylist()[0]["id"] == "belle-k2"
    assert rejects.to_pylist()[1]["reason"] == "missing field 'input'"


def test_dpo_and_unknown_template(tmp_path):
    path = write(tmp_path / "d.jsonl", "jsonl", [{"q": "问", "good": "好", "bad": "坏"}])
    rows, _, _ = parse_source(path, "jsonl", source="d", kind="dpo",
                              templates={"prompt": "{q}", "chosen": "{good}", "rejected": "{bad}"})
    assert rows.to_pylist() == [{"id": "d:0", "source": "d", "prompt": "问", "chosen": "好",
                                 "rejected": "坏"}]
    with pytest.raises(ValueError, match="respons"):
        parse_source(path, "jsonl", source="d", kind="dpo", templates={"respons": "{q}"})


def test_limit(tmp_path):
    # `limit` counts records: blank lines are not records, and are counted wherever they are.
    path = tmp_path / "l.jsonl"
    path.write_text("\n" + "".join(json.dumps({"text": f"第{i}行"}) + "\n \n" for i in range(10))
                    + "not json\n", encoding="utf-8")
    rows, rejects, stats = parse_source(path, "jsonl", source="s", kind="pretrain", limit=4)
    check_counts(stats, rows, rejects)
    assert rows.column("text").to_pylist() == [f"第{i}行" for i in range(4)]
    assert rows.column("id").to_pylist() == ["s:1", "s:3", "s:5", "s:7"]  # their lines
    assert stats["rows_in"] == 4 and stats["records_beyond_limit"] == 7 and stats["blank_lines_skipped"] == 11


BLANK = [b"", b"   ", b"\t \x0b", b"\r"]  # a line of nothing but whitespace is blank; b"\r": a CRLF blank line


def blank_lines_source(path, fmt: str) -> list[bytes]:
    """Write a source whose lines include blank ones at the start, in the middle (several in a
    row), and at the end, with LF and CRLF endings and a BOM; return its physical lines."""
    records = [{"text": "春眠不觉晓"}, {"id": "own", "text": "处处闻啼鸟"}, {"text": "坏"},
               {"text": "夜来风雨声"}, {"text": "花落知多少"}]
    if fmt == "txt":
        lines = [r["text"].encode() for r in records]
        lines[2] = b"\xff bad"
    else:
        lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
        lines[2] = b'{"text": "broken'
    physical = [b"", *BLANK, lines[0], lines[1], b"", lines[2], *BLANK, b"", lines[3], b"  ", lines[4], *BLANK]
    data = b"\xef\xbb\xbf" + b"".join(line + (b"\r\n" if k % 2 else b"\n") for k, line in enumerate(physical))
    path.write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)
    return physical


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz", "s.txt"])
def test_blank_lines_are_counted_and_lines_keep_their_numbers(name, tmp_path):
    fmt = name.split(".")[1]
    physical = blank_lines_source(tmp_path / name, fmt)
    rows, rejects, stats = parse_source(tmp_path / name, fmt, source="s", kind="pretrain")
    check_counts(stats, rows, rejects)
    blank = [k for k, line in enumerate(physical) if not line.strip()]
    assert stats["blank_lines_skipped"] == len(blank) == 16
    assert stats["rows_in"] + stats["blank_lines_skipped"] == len(physical)  # every line counted once
    # A reject names the line of the bad record (0-based: index i is line i + 1).
    (reject,) = rejects.to_pylist()
    assert physical[reject["index"]] == (b"\xff bad" if fmt == "txt" else b'{"text": "broken')
    # A default id is SOURCE:LINE, the line that holds the record.
    ids = rows.column("id").to_pylist()
    for row in rows.to_pylist():
        if row["id"] != "own":
            line = physical[int(row["id"].removeprefix("s:"))].decode()
            assert (line if fmt == "txt" else json.loads(line)["text"]) == row["text"]
    assert ids == ["s:5", "s:6" if fmt == "txt" else "own", "s:14", "s:16"]


def test_unknown_format_and_kind(tmp_path):
    with pytest.raises(ValueError, match="jsonl, json, parquet, csv, txt"):
        read_records(tmp_path / "x", "xml")
    with pytest.raises(ValueError, match="kind"):
        parse_source(tmp_path / "x", "jsonl", source="s", kind="chat")


def test_many_rows_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("zhlm.data.formats.BATCH_ROWS", 7)
    path = write(tmp_path / "m.txt", "txt", [{"text": f"行{i}"} for i in range(50)])
    rows, rejects, stats = parse_source(path, "txt", source="s", kind="pretrain")
    assert rows.column("text").to_pylist() == [f"行{i}" for i in range(50)]
    assert rejects.num_rows == 0 and stats["rows_kept"] == 50
