"""Binarization throughput beside the tokenizer's own `encode_batch` alone.

    python benchmarks/bench_binarize.py [--text 'results/split/pretrain/*/*/train.parquet']
        [--tokenizer results/tokenizer/tokenizer.json]

Run the demo first (`snakemake --cores all results/tokens/train.bin`). Prints
tokens/s of `zhlm.binarize.binarize` (read parquet, encode, write the uint16
file) and of `Tokenizer.encode_batch` over the same texts held in memory.
"""
import argparse
import glob
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer

from zhlm.tokenizer.binarize import binarize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="results/split/pretrain/*/*/train.parquet", help="a glob of parquet files")
    ap.add_argument("--tokenizer", default="results/tokenizer/tokenizer.json")
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()

    files = sorted(glob.glob(args.text))
    if not files:
        raise SystemExit(f"no file matches {args.text}: run the demo first")
    texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column(0).to_pylist() if t]
    tokenizer = Tokenizer.from_file(args.tokenizer)
    start = time.perf_counter()
    n = 0
    for i in range(0, len(texts), args.batch_size):
        n += sum(len(e.ids) + 1 for e in tokenizer.encode_batch(texts[i:i + args.batch_size], add_special_tokens=False))
    alone = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        meta = binarize(files, args.tokenizer, Path(tmp) / "train.bin", batch_size=args.batch_size, progress=False)
        ours = time.perf_counter() - start
    assert meta["tokens"] == n, (meta["tokens"], n)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{len(texts)} documents, {mb:.1f} MB, {n} tokens")
    print(f"encode_batch alone: {n / alone:,.0f} tokens/s ({alone:.2f} s)")
    print(f"binarize:           {n / ours:,.0f} tokens/s ({ours:.2f} s), {n / ours / (n / alone):.2f}x encode_batch")


if __name__ == "__main__":
    main()
