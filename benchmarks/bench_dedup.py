"""Benchmark dedup on the demo pretraining corpus (news + reviews + idioms) with planted copies.

Before: the single-process `dedup_table` of zhlm.data.dedup as of commit OLD_REV (table order,
Jaccard 0.7, no short-text check), loaded from git. After: the staged dedup of today
(signatures per shard → exact → band jobs → cluster → filter per shard), every job in a
fresh process, as the workflow runs them. One run prints, side by side:

- recall: planted near duplicates (copies of real documents with ~5% of their characters
  replaced by other Han characters) removed as duplicates of their original (or of the row
  the original itself was removed for), all and by length of the copy;
- distinct removed: near-duplicate removals on the corpus without planted copies, as a
  share of its distinct (after exact dedup) documents. The demo corpus has real near
  duplicates (idiom variants with the same explanation, reviews posted twice with an edit),
  so this share is not all false positives;
- wall time and peak RSS: of the one old process, and of each staged job (its largest, and
  the sum of their times as on one core). Each job's RSS includes the interpreter with its
  imports (printed as "baseline").

Targets: recall ≥ 95%, ≤ 1% of distinct documents removed.

    python benchmarks/bench_dedup.py [--copies 2000] [--shards 4] [--band-jobs 4]
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import importlib.util
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from zhlm.data import dedup, demo
from zhlm.data.clean import HAN, clean_text
from zhlm.data.schema import rows_table
from zhlm.io import read_parquets, write_parquet

OLD_REV = "7d8ddd3"   # the last commit with the monolithic dedup
REPO = Path(__file__).resolve().parents[1]
LENGTHS = [(0, 20), (20, 40), (40, 100), (100, 10**9)]


def planted_copies(rows: list[dict], n: int, rate: float, seed: int = 0) -> list[dict]:
    """`n` copies of random rows with max(1, round(rate·len)) characters replaced by other Han characters."""
    import random
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
        copies.append({"id": f"planted:{k}", "source": "planted", "text": "".join(chars),
                       "original": rows[i]["id"]})
    return copies


def recall(removed: list[dict], copies: list[dict]) -> dict:
    """Share of copies found, all and by length: the copy or its original removed, and both
    ending at the same kept row when their `duplicate_of` links are followed. (Which of the
    two stays depends on the order: table order before, id order after.)"""
    dup_of = {r["id"]: r["duplicate_of"] for r in removed}

    def root(row_id):
        while row_id in dup_of:
            row_id = dup_of[row_id]
        return row_id

    hits = collections.defaultdict(list)
    for c in copies:
        hit = (c["id"] in dup_of or c["original"] in dup_of) and root(c["id"]) == root(c["original"])
        hits["all"].append(hit)
        lo, hi = next((lo, hi) for lo, hi in LENGTHS if lo <= len(c["text"]) < hi)
        hits[f"{lo}-{hi if hi < 10**9 else ''} chars"].append(hit)
    return {k: (sum(v) / len(v), len(v)) for k, v in hits.items()}


# --- jobs, each in a fresh process --------------------------------------------------------


def _job(fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    # VmHWM, not ru_maxrss: the latter survives exec, so a spawned child would report its parent's.
    status = Path("/proc/self/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    return result, time.perf_counter() - t, peak


def run_job(fn, *args):
    """(result, seconds, peak RSS MiB) of fn(*args) in a new process."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_job, fn, *args).result()


def baseline():
    return None


def old_dedup(paths: list[str], removed_out: str) -> dict:
    path = Path(tempfile.mkdtemp()) / "old_dedup.py"
    path.write_text(subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_REV}:src/zhlm/data/dedup.py"],
                                   capture_output=True, text=True, check=True).stdout)
    spec = importlib.util.spec_from_file_location("old_dedup", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    _, removed, stats = old.dedup_table(read_parquets(paths), "pretrain")
    write_parquet(removed, removed_out)
    return stats


def signatures_job(path, out, source_no, shard):
    write_parquet(dedup.signature_table(pq.read_table(path), "pretrain", source_no=source_no, shard=shard), out)


def exact_job(sigs, out):
    write_parquet(dedup.exact_duplicates(pl.scan_parquet(sigs)).to_arrow(), out)


def bands_job(sigs, exact, bands, out):
    write_parquet(dedup.candidate_pairs(pl.scan_parquet(sigs), pl.scan_parquet(exact), bands).to_arrow(), out)


def cluster_job(sigs, exact, pairs, out):
    duplicates, stats = dedup.near_duplicates(pl.scan_parquet(sigs), pl.read_parquet(exact),
                                              pl.scan_parquet(pairs), dedup.Params())
    write_parquet(duplicates.to_arrow(), out)
    return stats


def filter_job(path, duplicates, out, source_no, shard):
    kept, removed, stats = dedup.filter_shard(pq.read_table(path), pl.scan_parquet(duplicates),
                                              source_no=source_no, shard=shard)
    write_parquet(kept, out)
    write_parquet(removed, out.replace(".parquet", ".removed.parquet"))
    return stats


def staged(shards: dict[str, list[str]], work: Path, band_jobs: int) -> tuple[list[dict], dict, dict]:
    """Every stage's jobs, one after another; removed rows, summary, and per-rule (seconds, max RSS)."""
    jobs = collections.defaultdict(list)

    def run(rule, fn, *args):
        result, seconds, rss = run_job(fn, *args)
        jobs[rule].append((seconds, rss))
        return result

    sigs = []
    for s, (source, paths) in enumerate(shards.items()):
        for k, path in enumerate(paths):
            sigs.append(str(work / f"sig.{source}.{k}.parquet"))
            run("signatures", signatures_job, path, sigs[-1], s, k)
    exact = str(work / "exact.parquet")
    run("exact", exact_job, sigs, exact)
    groups = dedup.band_groups(dedup.band_columns(pq.read_schema(sigs[0]).names), band_jobs)
    pairs = [str(work / f"pairs.{j}.parquet") for j in range(band_jobs)]
    for group, out in zip(groups, pairs):
        run("bands", bands_job, sigs, exact, group, out)
    duplicates = str(work / "duplicates.parquet")
    clusters = run("cluster", cluster_job, sigs, exact, pairs, duplicates)
    removed, shard_stats = [], {}
    for s, (source, paths) in enumerate(shards.items()):
        for k, path in enumerate(paths):
            out = str(work / f"kept.{source}.{k}.parquet")
            shard_stats[f"{source}/{k}"] = run("filter", filter_job, path, duplicates, out, s, k)
            removed += pq.read_table(out.replace(".parquet", ".removed.parquet")).to_pylist()
    return removed, dedup.summarise(shard_stats, clusters, dedup.Params()), jobs


def write_shards(rows: list[dict], folder: Path, n_shards: int) -> dict[str, list[str]]:
    by_source = collections.defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r)
    shards = {}
    for source, part in by_source.items():
        bounds = [round(i * len(part) / n_shards) for i in range(n_shards + 1)]
        shards[source] = []
        for k in range(n_shards):
            path = folder / f"{source}.{k}.parquet"
            write_parquet(rows_table(part[bounds[k]:bounds[k + 1]], "pretrain"), path)
            shards[source].append(str(path))
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--shards", type=int, default=4, help="clean shards per source")
    ap.add_argument("--band-jobs", type=int, default=4)
    args = ap.parse_args()

    raw = [r for name in ("news", "reviews", "idioms") for r in demo.build(name)]
    rows = [{"id": r["id"], "source": r["id"].split(":")[0], "text": clean_text(r["text"])} for r in raw]
    copies = planted_copies(rows, args.copies, args.rate)
    print(f"corpus: {len(rows):,} docs, {sum(len(r['text']) for r in rows) / 1e6:.2f}M chars; planted "
          f"{len(copies):,} copies with {args.rate:.0%} of characters substituted; {args.shards} shards per "
          f"source, {args.band_jobs} band jobs; {dedup.DEFAULTS}")

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, corpus in (("base", rows), ("copies", rows + copies)):
            folder = tmp / name
            folder.mkdir()
            shards = write_shards(corpus, folder, args.shards)
            paths = [p for ps in shards.values() for p in ps]
            old_stats, seconds, rss = run_job(old_dedup, paths, str(folder / "old.removed.parquet"))
            old_removed = pq.read_table(folder / "old.removed.parquet").to_pylist()
            new_removed, new_stats, jobs = staged(shards, folder, args.band_jobs)
            figures[name] = {"old": (old_removed, old_stats, seconds, rss), "new": (new_removed, new_stats, jobs)}
        _, _, base_rss = run_job(baseline)

    print(f"\n{'':28s}{'before (' + OLD_REV + ')':>22s}{'after (staged)':>22s}")
    rec_old = recall(figures["copies"]["old"][0], copies)
    rec_new = recall(figures["copies"]["new"][0], copies)
    for key in ["all"] + sorted((k for k in rec_old if k != "all"), key=lambda k: int(k.split("-")[0])):
        print(f"{'recall ' + key + f' ({rec_old[key][1]})':28s}{rec_old[key][0]:>22.1%}{rec_new[key][0]:>22.1%}")
    rows_of = collections.Counter(r["source"] for r in rows)
    shares = {}
    for side in ("old", "new"):
        removed = figures["base"][side][0]
        exact = collections.Counter(r["source"] for r in removed if r["reason"] == "exact")
        near = collections.Counter(r["source"] for r in removed if r["reason"] == "near")
        distinct = {s: rows_of[s] - exact[s] for s in rows_of}
        shares[side] = {"all": (sum(near.values()), sum(distinct.values()))} | {
            s: (near[s], distinct[s]) for s in rows_of}
    for key in shares["old"]:
        cells = [f"{n / d:.2%} ({n}/{d:,})" for n, d in (shares["old"][key], shares["new"][key])]
        print(f"{'distinct removed ' + key:28s}{cells[0]:>22s}{cells[1]:>22s}")
    old_seconds, old_rss = figures["copies"]["old"][2:]
    jobs = figures["copies"]["new"][2]
    total = sum(s for js in jobs.values() for s, _ in js)
    peak = max(r for js in jobs.values() for _, r in js)
    print(f"\nwith copies ({len(rows) + len(copies):,} docs); job process baseline {base_rss:.0f} MiB RSS")
    print(f"before: one process        {old_seconds:7.2f} s  peak RSS {old_rss:6.0f} MiB")
    n_jobs = sum(map(len, jobs.values()))
    print(f"after:  {n_jobs:3d} jobs, sum      {total:7.2f} s  peak RSS {peak:6.0f} MiB (largest job)")
    for rule, js in jobs.items():
        seconds, rss = sum(s for s, _ in js), max(r for _, r in js)
        print(f"  {rule:11s} {len(js):3d} jobs {seconds:7.2f} s  max RSS {rss:6.0f} MiB")
    print(f"  cluster: {figures['copies']['new'][1]['clusters']}")


if __name__ == "__main__":
    sys.exit(main())
