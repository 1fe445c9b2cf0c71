"""Benchmark cleaning and dedup on the demo pretraining corpus (news + reviews + idioms).

Prints:
- cleaning speed: MB/s of UTF-8 input, one process;
- dedup speed: docs/s of the whole `dedup_table`, processes=1 and 2;
- recall: planted near duplicates (copies of real documents with ~5% of their
  characters replaced by other CJK characters, appended after the originals)
  that dedup removes as duplicates of their original (or of the row the
  original itself was removed for);
- distinct removed: near-duplicate removals on the corpus without planted
  copies, as a share of its distinct (after exact dedup) documents, by source.
  The demo corpus has real near duplicates (idiom dictionary variants such as
  信口开呵/信口开喝 with the same explanation, reviews posted twice with an edit),
  so this share is not all false positives.

Targets: ≥ 10,000 docs/s, recall ≥ 95%, ≤ 1% of distinct documents removed.

    python benchmarks/bench_clean_dedup.py            # defaults
    python benchmarks/bench_clean_dedup.py --sweep    # + a small ngram/threshold sweep
"""
from __future__ import annotations

import argparse
import collections
import random
import re
import time

from zhlm.data import demo
from zhlm.data.clean import HAN, clean_text
from zhlm.data.dedup import DEFAULTS, dedup_table
from zhlm.data.schema import rows_table

SWEEP = [(5, 0.8), (5, 0.5), (3, 0.6), (3, 0.7), (2, 0.6), (2, 0.65), (2, 0.7), (2, 0.75)]


def planted_copies(rows: list[dict], n: int, rate: float, seed: int = 0) -> list[dict]:
    """`n` copies of random rows with max(1, round(rate·len)) characters replaced by other Han characters."""
    han = re.compile(f"[{HAN}]")
    alphabet = sorted({ch for r in rows for ch in r["text"] if han.match(ch)})
    rng = random.Random(seed)
    copies = []
    for k, i in enumerate(rng.sample(range(len(rows)), n)):
        chars = list(rows[i]["text"])
        for pos in rng.sample(range(len(chars)), max(1, round(rate * len(chars)))):
            new = rng.choice(alphabet)
            while new == chars[pos]:
                new = rng.choice(alphabet)
            chars[pos] = new
        copies.append({"id": f"planted:{k}", "text": "".join(chars), "original": rows[i]["id"]})
    return copies


def recall(removed: list[dict], copies: list[dict]) -> tuple[float, float]:
    """Share of copies removed as duplicates of their original: all, and those of 20+ characters."""
    dup_of = {r["id"]: r["duplicate_of"] for r in removed}
    hits = []
    for c in copies:
        target = dup_of.get(c["id"])
        # The original may itself have been removed as a duplicate of an earlier row.
        hits.append(target is not None and target in (c["original"], dup_of.get(c["original"])))
    long = [hit for hit, c in zip(hits, copies) if len(c["text"]) >= 20]
    return sum(hits) / len(hits), sum(long) / len(long)


def evaluate(base, with_copies, copies, **params) -> dict:
    t = time.perf_counter()
    _, removed, stats = dedup_table(with_copies, "pretrain", **params)
    seconds = time.perf_counter() - t
    _, removed_base, stats_base = dedup_table(base, "pretrain", **params)
    distinct = stats_base["rows_in"] - stats_base["removed_exact"]
    near = [r["id"].split(":")[0] for r in removed_base.to_pylist() if r["reason"] == "near"]
    found = recall(removed.to_pylist(), copies)
    return {
        "docs_per_s": with_copies.num_rows / seconds,
        "recall": found[0],
        "recall_20": found[1],
        "distinct_removed": stats_base["removed_near"] / distinct,
        "by_source": dict(collections.Counter(near)),
        "lsh": f'{stats["params"]["lsh_bands"]}x{stats["params"]["lsh_rows"]}',
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()

    raw = [r for name in ("news", "reviews", "idioms") for r in demo.build(name)]
    mb = sum(len(r["text"].encode("utf-8")) for r in raw) / 1e6
    chars = sum(len(r["text"]) for r in raw)
    print(f"corpus: {len(raw):,} docs, {chars / 1e6:.2f}M chars, {mb:.1f} MB UTF-8")

    t = time.perf_counter()
    rows = [{"id": r["id"], "text": clean_text(r["text"])} for r in raw]
    seconds = time.perf_counter() - t
    print(f"clean_text: {mb / seconds:.1f} MB/s ({seconds:.2f} s, 1 process)")

    copies = planted_copies(rows, args.copies, args.rate)
    base = rows_table(rows, "pretrain")
    with_copies = rows_table(rows + copies, "pretrain")
    print(f"planted: {len(copies):,} copies with {args.rate:.0%} of characters substituted")

    for processes in (1, 2):
        t = time.perf_counter()
        _, _, stats = dedup_table(with_copies, "pretrain", processes=processes)
        seconds = time.perf_counter() - t
        print(f"dedup_table defaults {DEFAULTS}, processes={processes}: "
              f"{with_copies.num_rows / seconds:,.0f} docs/s ({seconds:.2f} s; "
              f"exact {stats['removed_exact']}, near {stats['removed_near']})")

    grid = [(DEFAULTS["ngram"], DEFAULTS["threshold"])]
    if args.sweep:
        grid += [g for g in SWEEP if g not in grid]
    print("\ntargets: >= 10,000 docs/s, recall >= 95%, <= 1% of distinct documents removed")
    print("ngram threshold  lsh    docs/s  recall (20+ chars)  distinct removed (by source)")
    for ngram, threshold in grid:
        r = evaluate(base, with_copies, copies, ngram=ngram, threshold=threshold)
        print(f"{ngram:5d} {threshold:9.2f}  {r['lsh']:5s} {r['docs_per_s']:7,.0f}  {r['recall']:6.1%} "
              f"({r['recall_20']:6.1%})   {r['distinct_removed']:6.2%} {r['by_source']}", flush=True)


if __name__ == "__main__":
    main()
