"""Benchmark cleaning on the demo pretraining corpus (news + reviews + idioms).

Prints the cleaning speed: MB/s of UTF-8 input, one process. Dedup (recall, share of
distinct documents removed, wall time and peak memory of the staged jobs against the
old single-process dedup) has its own benchmark: benchmarks/bench_dedup.py.

    python benchmarks/bench_clean_dedup.py
"""
from __future__ import annotations

import argparse
import time

from zhlm.data import demo
from zhlm.data.clean import clean_text


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    raw = [r for name in ("news", "reviews", "idioms") for r in demo.build(name)]
    mb = sum(len(r["text"].encode("utf-8")) for r in raw) / 1e6
    chars = sum(len(r["text"]) for r in raw)
    print(f"corpus: {len(raw):,} docs, {chars / 1e6:.2f}M chars, {mb:.1f} MB UTF-8")
    t = time.perf_counter()
    for r in raw:
        clean_text(r["text"])
    seconds = time.perf_counter() - t
    print(f"clean_text: {mb / seconds:.1f} MB/s ({seconds:.2f} s, 1 process)")


if __name__ == "__main__":
    main()
