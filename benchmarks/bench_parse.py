"""Benchmark parsing a large source: the streaming parser against a whole-file json.load.

Writes a JSON array and a jsonl of about --mb MB of real demo text (People's Daily sentences
from zhlm.data.demo, recombined into documents), then parses each, every run in its own
subprocess:

- stream:      zhlm.data.formats.parse_to_parquet, the whole file as one shard;
- stream k/N:  the last of N shards (jsonl: its byte range, after counting the lines before
               it; JSON array: a counting pass, then its element range);
- json.load:   the baseline, json.load of the array (json.loads of every line for jsonl),
               then one Arrow table written to parquet.

Prints wall time, MB/s and peak RSS (each child's ru_maxrss, from os.wait4) side by side.
The parent stays small (~20 MB), since a child's ru_maxrss counts from its parent's RSS at the fork.

    python benchmarks/bench_parse.py            # 300 MB
    python benchmarks/bench_parse.py --mb 50
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_corpus(folder: Path, mb: float, seed: int = 0) -> tuple[Path, Path, int]:
    """A jsonl and a JSON array of the same documents, each about `mb` MB."""
    from zhlm.data import demo
    sentences = [s for row in demo.news() for s in demo._SENTENCE_END.split(row["text"]) if s.strip()]
    rng = random.Random(seed)
    jsonl, array = folder / "corpus.jsonl", folder / "corpus.json"
    size, n = 0, 0
    with open(jsonl, "w", encoding="utf-8") as lines, open(array, "w", encoding="utf-8") as arr:
        arr.write("[\n")
        while size < mb * 1e6:
            doc = {"id": f"doc-{n}", "text": "".join(rng.choices(sentences, k=rng.randint(2, 12)))}
            line = json.dumps(doc, ensure_ascii=False)
            lines.write(line + "\n")
            arr.write(("," if n else "") + line + "\n")
            size += len(line.encode()) + 1
            n += 1
        arr.write("]\n")
    return jsonl, array, n


def worker(mode: str, path: str, fmt: str, out: str, shard: int, n_shards: int) -> None:
    if mode == "write":
        rows = write_corpus(Path(path), float(fmt))[2]
    elif mode == "stream":
        from zhlm.data.formats import parse_to_parquet
        stats = parse_to_parquet(path, fmt, f"{out}.parquet", f"{out}.rejects.parquet", source="bench",
                                 kind="pretrain", shard=shard, n_shards=n_shards)
        rows = stats["rows_kept"]
    else:  # the whole file in memory, as a plain json.load does it
        import pyarrow as pa
        import pyarrow.parquet as pq
        with open(path, encoding="utf-8") as f:
            records = json.load(f) if fmt == "json" else [json.loads(line) for line in f if line.strip()]
        table = pa.Table.from_pylist([{"id": r["id"], "source": "bench", "text": r["text"]} for r in records])
        pq.write_table(table, f"{out}.parquet", compression="zstd")
        rows = table.num_rows
    print(rows)


def run(mode: str, path: Path, fmt: str, out: Path, shard: int = 0, n_shards: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, str(path), fmt, str(out), str(shard), str(n_shards)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    rows = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{mode} {fmt} failed ({proc.returncode})")
    return {"rows": int(rows), "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=300, help="size of each source file")
    ap.add_argument("--shards", type=int, default=4, help="N of the 'stream k/N' run (its last shard)")
    ap.add_argument("--dir", help="folder for the files (default: a temporary one)")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        mode, path, fmt, out, shard, n_shards = args.worker
        return worker(mode, path, fmt, out, int(shard), int(n_shards))

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        # Written in a child too: a child's ru_maxrss starts from its parent's RSS at the fork,
        # so this process keeps the demo corpus out of its own memory.
        docs = run("write", folder, str(args.mb), folder)["rows"]
        jsonl, array = folder / "corpus.jsonl", folder / "corpus.json"
        print(f"corpus: {docs:,} documents; jsonl {jsonl.stat().st_size / 1e6:.0f} MB, "
              f"JSON array {array.stat().st_size / 1e6:.0f} MB (written in {time.perf_counter() - start:.0f} s)")
        k = args.shards - 1
        print(f"{'format':<11}{'parser':<14}{'rows':>10}{'wall s':>9}{'MB/s':>8}{'peak RSS MB':>13}")
        for path, fmt in ((array, "json"), (jsonl, "jsonl")):
            mb = path.stat().st_size / 1e6
            for label, mode, shard, n in (("stream", "stream", 0, 1),
                                          (f"stream {k + 1}/{args.shards}", "stream", k, args.shards),
                                          ("json.load", "load", 0, 1)):
                r = run(mode, path, fmt, folder / f"out-{fmt}-{mode}-{shard}", shard, n)
                print(f"{fmt:<11}{label:<14}{r['rows']:>10,}{r['seconds']:>9.1f}{mb / r['seconds']:>8.1f}"
                      f"{r['rss_mb']:>13,.0f}", flush=True)


if __name__ == "__main__":
    main()
