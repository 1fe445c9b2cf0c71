"""How the data half of the DAG scales: peak memory and time per rule at 1× and 10×, and dedup quality.

For each scale N it builds a synthetic pretraining corpus of N × --base-chars characters
(default 7.3M, about the demo's pretraining text) and runs Snakemake on it up to
results/tokens/train.bin (download → parse → clean → dedup → split → count_words →
build_tokenizer → binarize), in a work folder of its own. It then prints:

- per rule: jobs, peak RSS (max over the rule's jobs of Snakemake's benchmark max_rss),
  and the sum and maximum of the jobs' seconds, at each scale, with the ratio last/first;
- each Snakemake run's wall-clock time and the ratio;
- dedup recall on planted copies (exact and near, near also by length), and the share
  of distinct documents removed;
- the targets beside the figures, with pass/fail: every rule's peak RSS at the largest
  scale ≤ 1.5 × its peak at the smallest (memory bounded by the shard, not the corpus),
  total wall ≤ the scale ratio (linear), recall ≥ 95%, ≤ 1% of distinct documents removed.

The corpus: the demo's news, review and idiom texts (zhlm.data.demo) split into sentences
at 。！？ and line ends, recombined at random into documents of a mixed length distribution
(30% short, 10–60 characters; 65% lognormal around 120; 5% long, 1,000–15,000). Every
document holds at least two sentences, so that two documents rarely share their whole
text. 2% of the documents get an exact copy and 3% a near copy (5% of their characters,
at least one, replaced by other CJK characters); all rows are shuffled and written to
--files jsonl files, each one `file://` source whose `shards` give every shard at most
--rows-per-shard rows whatever N is (so the shard count grows with N; by default the
smallest scale's files get two shards each, ~5,000 rows at 7.3M characters). Ids:
`bench:7` is a document, `bench:7#exact` / `bench:7#near` its planted copy (the split
hashes the part before `#`, so a copy lands in its original's split). The config
copies config/config.yaml's clean, dedup, split, tokenizer and binarize sections.

Recall counts a planted pair as found when dedup removed the copy, or removed the
original as a duplicate of its copy (the copy may come first). "Distinct removed" is
over the documents that have no planted copy and whose normalised text (zhlm's dedup
normalise) is not an earlier document's; natural exact duplicates are reported apart.

    python benchmarks/bench_scale.py                       # 1× and 10× of 7.3M characters
    python benchmarks/bench_scale.py --base-chars 500000 --scales 1 2     # a quick check
    python benchmarks/bench_scale.py --work /tmp/bench_scale --cores 4 --files 4

Each scale runs in WORK/x{N} (deleted first); its Snakemake output is in WORK/x{N}/snakemake.log.
"""
from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from zhlm.data import demo
from zhlm.data.clean import HAN
from zhlm.data.dedup import normalise

REPO = Path(__file__).resolve().parents[1]
TARGET = "results/tokens/train.bin"
CONFIG_SECTIONS = ("clean", "dedup", "split", "tokenizer", "binarize")
EXACT_RATE, NEAR_RATE, NEAR_SUBSTITUTED = 0.02, 0.03, 0.05
SHORT_DOC = 60                         # near recall is also shown for documents below / above this
RSS_TARGET, RECALL_TARGET, DISTINCT_TARGET = 1.5, 0.95, 0.01
MIN_SAMPLED_S = 1.0                    # Snakemake samples memory about once a second: shorter jobs read ~0
_SENTENCE_END = re.compile(r"(?<=[。！？])|\n")
_HAN_CHAR = re.compile(f"[{HAN}]")


# --- the corpus -------------------------------------------------------------------

def demo_sentences() -> list[str]:
    """Distinct sentences of the demo's pretraining texts, mostly Chinese, shortest first."""
    sentences = set()
    for name in ("news", "reviews", "idioms"):
        for row in demo.build(name):
            for s in _SENTENCE_END.split(row["text"]):
                s = s.strip()
                if len(s) >= 2 and len(_HAN_CHAR.findall(s)) >= len(s) / 2:
                    sentences.add(s)
    return sorted(sentences, key=lambda s: (len(s), s))


class Composer:
    """Documents of a given length made of random sentences, each at most half of it."""

    def __init__(self, sentences: list[str]):
        self.sentences = sentences
        self.lengths = [len(s) for s in sentences]

    def compose(self, target: int, rng: random.Random) -> str:
        pieces, size = [], 0
        cap = max(self.lengths[0], target // 2)
        while size < target:
            fitting = bisect.bisect_right(self.lengths, min(cap, target - size))
            if not fitting:
                break
            pieces.append(self.sentences[rng.randrange(fitting)])
            size += len(pieces[-1])
        return "".join(pieces)


def doc_length(rng: random.Random) -> int:
    """30% short (10–60), 65% medium (lognormal, median 120, 60–2,000), 5% long (1,000–15,000)."""
    draw = rng.random()
    if draw < 0.30:
        return rng.randint(10, 60)
    if draw < 0.95:
        return min(2_000, max(60, round(rng.lognormvariate(math.log(120), 0.8))))
    return round(math.exp(rng.uniform(math.log(1_000), math.log(15_000))))


def near_copy(text: str, alphabet: list[str], rng: random.Random) -> str:
    """`text` with NEAR_SUBSTITUTED of its characters (at least one) replaced by other CJK characters."""
    chars = list(text)
    for pos in rng.sample(range(len(chars)), max(1, round(NEAR_SUBSTITUTED * len(chars)))):
        new = rng.choice(alphabet)
        while new == chars[pos]:
            new = rng.choice(alphabet)
        chars[pos] = new
    return "".join(chars)


def build_corpus(chars: int, sentences: list[str], seed: int = 0) -> list[dict]:
    """Documents of `chars` characters in all, plus their planted copies, shuffled."""
    rng = random.Random(seed)
    composer = Composer(sentences)
    docs, total = [], 0
    while total < chars:
        text = composer.compose(doc_length(rng), rng)
        docs.append({"id": f"bench:{len(docs)}", "text": text})
        total += len(text)
    alphabet = sorted({c for s in sentences for c in s if _HAN_CHAR.match(c)})
    n_exact, n_near = round(EXACT_RATE * len(docs)), round(NEAR_RATE * len(docs))
    chosen = rng.sample(docs, n_exact + n_near)
    copies = [{"id": d["id"] + "#exact", "text": d["text"]} for d in chosen[:n_exact]]
    copies += [{"id": d["id"] + "#near", "text": near_copy(d["text"], alphabet, rng)} for d in chosen[n_exact:]]
    rows = docs + copies
    rng.shuffle(rows)
    return rows


def write_corpus(rows: list[dict], folder: Path, files: int) -> list[tuple[Path, int]]:
    """`rows` as `files` jsonl files of consecutive rows: (path, rows) of each."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(files):
        part = rows[k * len(rows) // files:(k + 1) * len(rows) // files]
        path = folder / f"bench_{k}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        written.append((path, len(part)))
    return written


# --- the workflow -----------------------------------------------------------------

def write_config(work: Path, files: list[tuple[Path, int]], rows_per_shard: int) -> int:
    """The demo config's data sections, with one file:// source per corpus file; the shard count."""
    demo_config = yaml.safe_load((REPO / "config/config.yaml").read_text(encoding="utf-8"))
    config = {"sources": {
        path.stem: {"kind": "pretrain", "uri": path.resolve().as_uri(), "format": "jsonl",
                    "shards": max(1, math.ceil(rows / rows_per_shard))}
        for path, rows in files}}
    config |= {section: demo_config[section] for section in CONFIG_SECTIONS if section in demo_config}
    (work / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    return sum(source["shards"] for source in config["sources"].values())


def run_snakemake(work: Path, cores: str) -> float:
    """Run the data half in `work`; its wall-clock seconds. Output goes to work/snakemake.log."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
               "--cores", cores, f"--configfile={work / 'config.yaml'}", TARGET]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(work / "snakemake.log", "w") as log:
        run = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if run.returncode:
        sys.exit(f"snakemake failed in {work}; the end of {work / 'snakemake.log'}:\n"
                 + (work / "snakemake.log").read_text()[-4000:])
    return seconds


# --- measurements -----------------------------------------------------------------

def benchmark_rules(log: str) -> dict[str, str]:
    """benchmark file → rule name, from the job descriptions in Snakemake's output."""
    rules, rule = {}, None
    for line in log.splitlines():
        if m := re.match(r"(?:local)?rule (\S+):$", line.strip()):
            rule = m[1]
        elif (m := re.match(r"benchmark: (\S+)$", line.strip())) and rule:
            rules[m[1]] = rule
    return rules


@dataclass
class RuleFigures:
    jobs: int = 0
    rss_mb: float = 0.0
    seconds: float = 0.0
    longest: float = 0.0


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # "NA" or "-" for a job too short to sample
        return 0.0


def rule_figures(work: Path) -> dict[str, RuleFigures]:
    """Snakemake's benchmark files grouped by rule (named from the log, else by the first
    folder under results/benchmarks/), rules in the order their first job finished."""
    root = work / "results/benchmarks"
    names = benchmark_rules((work / "snakemake.log").read_text())
    figures: dict[str, RuleFigures] = {}
    for path in sorted(root.rglob("*.tsv"), key=lambda p: p.stat().st_mtime):
        relative = path.relative_to(work).as_posix()
        rule = names.get(relative, path.relative_to(root).parts[0])
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                fig = figures.setdefault(rule, RuleFigures())
                seconds = _number(row["s"])
                fig.jobs += 1
                fig.rss_mb = max(fig.rss_mb, _number(row["max_rss"]))
                fig.seconds += seconds
                fig.longest = max(fig.longest, seconds)
    return figures


def parquet_rows(work: Path, pattern: str, columns: list[str]) -> list[dict]:
    """Rows (only `columns`) of every parquet file under work/results matching `pattern`."""
    rows = []
    for path in sorted((work / "results").glob(pattern)):
        rows += pq.read_table(path, columns=columns).to_pylist()
    return rows


def dedup_quality(work: Path, rows: list[dict]) -> dict:
    """Recall on planted copies (exact, near, near by length) and the share of distinct documents removed."""
    removals = parquet_rows(work, "dedup/**/*removed.parquet", ["id", "duplicate_of"])
    removed = {r["id"]: r["duplicate_of"] for r in removals}
    rejected = {r["id"] for r in parquet_rows(work, "**/*rejects.parquet", ["id"])}
    texts = {r["id"]: r["text"] for r in rows}
    copies = [i for i in texts if "#" in i]
    copied = {c.split("#")[0] for c in copies}
    found: dict[str, list[bool]] = {"exact": [], "near": [], f"near < {SHORT_DOC} chars": [],
                                    f"near ≥ {SHORT_DOC} chars": []}
    skipped = 0
    for copy in copies:
        original, kind = copy.split("#")
        if copy in rejected or original in rejected:
            skipped += 1
            continue
        hit = copy in removed or removed.get(original) == copy
        found[kind].append(hit)
        if kind == "near":
            found[f"near {'<' if len(texts[original]) < SHORT_DOC else '≥'} {SHORT_DOC} chars"].append(hit)
    seen, natural, distinct = set(), 0, []
    for i in sorted((i for i in texts if "#" not in i), key=lambda i: int(i.split(":")[1])):
        key = normalise(texts[i])
        if key in seen:
            natural += 1
        elif i not in copied and i not in rejected:
            distinct.append(i in removed)
        seen.add(key)
    return {"found": found, "all": found["exact"] + found["near"], "distinct": distinct,
            "natural": natural, "skipped": skipped, "rejected": len(rejected), "removed": len(removed)}


# --- the report -------------------------------------------------------------------

def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}" if a else "-"


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) if k else str(x).ljust(w) for k, (x, w) in enumerate(zip(line, widths))))


def print_rules(scales: list[int], figures: list[dict[str, RuleFigures]]) -> None:
    first, last = scales[0], scales[-1]
    tags = [f"{s}×" for s in scales]
    header = (["rule", "jobs"] + [f"RSS MB {t}" for t in tags] + ["ratio"] + [f"s sum {t}" for t in tags]
              + ["ratio"] + [f"s max {t}" for t in tags] + [f"RSS ≤ {RSS_TARGET}×"])
    rows, short = [], False
    for rule in sorted(set().union(*figures), key=lambda r: min(list(f).index(r) for f in figures if r in f)):
        figs = [f.get(rule, RuleFigures()) for f in figures]
        rss_ratio = figs[-1].rss_mb / figs[0].rss_mb if figs[0].rss_mb else math.inf
        sampled = min(f.longest for f in figs) >= MIN_SAMPLED_S
        short |= not sampled
        rows.append([rule, "/".join(str(f.jobs) for f in figs)]
                    + [f"{f.rss_mb:.0f}" for f in figs] + [ratio(figs[0].rss_mb, figs[-1].rss_mb)]
                    + [f"{f.seconds:.1f}" for f in figs] + [ratio(figs[0].seconds, figs[-1].seconds)]
                    + [f"{f.longest:.1f}" for f in figs] + [verdict(rss_ratio <= RSS_TARGET) if sampled else "short*"])
    print(f"\nPer rule (peak RSS = max over its jobs; ratio = {last}× / {first}×)\n")
    print_table(header, rows)
    if short:
        print(f"* its longest job took < {MIN_SAMPLED_S:g} s at some scale: Snakemake's benchmark "
              "samples memory about once a second, so its RSS is not measured reliably")


def print_walls(scales: list[int], walls: list[float]) -> None:
    print("\nSnakemake wall-clock: " + ", ".join(f"{s}×: {w:.1f} s" for s, w in zip(scales, walls)))
    if len(scales) > 1:
        limit = scales[-1] / scales[0]
        print(f"  ratio {walls[-1] / walls[0]:.2f} (target ≤ {limit:g}): {verdict(walls[-1] / walls[0] <= limit)}")


def share(hits: list[bool]) -> str:
    return f"{sum(hits)}/{len(hits)} = {sum(hits) / len(hits):.1%}" if hits else "-"


def print_quality(scale: int, q: dict) -> None:
    print(f"\nDedup at {scale}×: {q['removed']} rows removed; {q['rejected']} rows rejected before dedup "
          f"({q['skipped']} planted pairs touched by a reject, left out); {q['natural']} natural exact duplicates")
    for name, hits in q["found"].items():
        print(f"  recall {name:<17} {share(hits)}")
    recall = sum(q["all"]) / len(q["all"]) if q["all"] else 0.0
    removed = sum(q["distinct"]) / len(q["distinct"]) if q["distinct"] else 0.0
    print(f"  recall, all planted      {share(q['all'])}  (target ≥ {RECALL_TARGET:.0%}): "
          f"{verdict(recall >= RECALL_TARGET)}")
    print(f"  distinct docs removed    {share(q['distinct'])}  (target ≤ {DISTINCT_TARGET:.0%}): "
          f"{verdict(removed <= DISTINCT_TARGET)}")


# --- main -------------------------------------------------------------------------

def run_scale(scale: int, args, sentences: list[str]) -> tuple[float, dict[str, RuleFigures], dict]:
    work = args.work / f"x{scale}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    rows = build_corpus(scale * args.base_chars, sentences, seed=scale)
    files = write_corpus(rows, work / "data", args.files)
    args.rows_per_shard = args.rows_per_shard or math.ceil(len(rows) / (2 * args.files))
    shards = write_config(work, files, args.rows_per_shard)
    print(f"{scale}×: {len(rows):,} rows, {sum(len(r['text']) for r in rows):,} characters, {len(files)} files, "
          f"{shards} shards of ≤ {args.rows_per_shard:,} rows (built in {time.perf_counter() - start:.1f} s); "
          "running Snakemake", flush=True)
    wall = run_snakemake(work, args.cores)
    print(f"{scale}×: Snakemake done in {wall:.1f} s", flush=True)
    return wall, rule_figures(work), dedup_quality(work, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10], help="multiples of --base-chars, smallest first")
    ap.add_argument("--base-chars", type=int, default=7_300_000, help="characters of the 1× corpus")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    ap.add_argument("--rows-per-shard", type=int,
                    help="rows of each clean shard, at every scale (default: 2 shards per file at the smallest)")
    ap.add_argument("--files", type=int, default=2, help="jsonl files (sources) the corpus is written to")
    ap.add_argument("--cores", default="all", help="Snakemake --cores")
    args = ap.parse_args()
    args.work = args.work.resolve()

    start = time.perf_counter()
    sentences = demo_sentences()
    print(f"{len(sentences):,} distinct demo sentences ({time.perf_counter() - start:.1f} s)", flush=True)
    results = [run_scale(scale, args, sentences) for scale in args.scales]
    walls, figures, qualities = zip(*results)
    print_rules(args.scales, list(figures))
    print_walls(args.scales, list(walls))
    for scale, quality in zip(args.scales, qualities):
        print_quality(scale, quality)


if __name__ == "__main__":
    main()
