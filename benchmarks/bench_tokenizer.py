"""Benchmark the jieba-guided BPE tokenizer against tokenizers' own BpeTrainer.

    python benchmarks/bench_tokenizer.py [--train TRAIN.parquet --heldout VAL.parquet \
        --column text --vocab-size 8000]

Prints (a) build seconds (jieba counting + BPE) and peak memory on 10% and 100% of the
training text, each build in a fresh subprocess whose process tree is sampled (RSS summed
over the tree, which over-counts pages a fork shares, and PSS, which splits them fairly);
(b) characters per token on the held-out text for ours and for a byte-level BpeTrainer
trained on the same text with the same vocab size and special tokens.

The defaults are the demo's pretraining splits: run `snakemake --cores all results/tokens/train.bin` first.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import psutil


def sampled_texts(path: str, column: str, fraction: float):
    """Every k-th row (k = 1/fraction), so a fraction spreads over the whole file."""
    from zhlm.tokenizer.word_counts import iter_parquet_texts

    step = max(1, round(1 / fraction))
    for i, text in enumerate(iter_parquet_texts(sorted(glob.glob(path)), [column])):
        if i % step == 0:
            yield text


def _child(args) -> None:
    """Run one build in this fresh process and print its stats as JSON."""
    texts = sampled_texts(args.train, args.column, args.fraction)
    chars = 0

    def counted(it):
        nonlocal chars
        for t in it:
            chars += len(t)
            yield t

    t0 = time.perf_counter()
    if args.child == "ours":
        from zhlm.tokenizer.bpe import build_from_texts

        tok, _, stats = build_from_texts(counted(texts), args.vocab_size, processes=args.processes,
                                         min_frequency=args.min_frequency, max_words=args.max_words)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from zhlm.tokenizer.bpe import SPECIAL_TOKENS

        tok = Tokenizer(models.BPE())
        # Default GPT-2 regex; no prefix space, which would cost it a token per text.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(counted(texts), trainer)
        stats = {"vocab_size": tok.get_vocab_size()}
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["train_chars"] = chars
    self_ru, child_ru = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the whole process and its workers (imports included): steadier than
    # wall time on a shared machine. Then the kernel's peaks: this process, and the
    # largest of its (finished) worker processes.
    stats["cpu_seconds"] = round(sum(r.ru_utime + r.ru_stime for r in (self_ru, child_ru)), 3)
    stats["maxrss_self_mib"] = self_ru.ru_maxrss / 1024
    stats["maxrss_children_mib"] = child_ru.ru_maxrss / 1024
    tok.save(args.out)
    print(json.dumps(stats))


def run_build(kind: str, args, fraction: float, out: str) -> dict:
    """Run a build in a subprocess and sample the memory of its whole process tree."""
    cmd = [sys.executable, __file__, "--child", kind, "--train", args.train, "--column", args.column,
           "--vocab-size", str(args.vocab_size), "--fraction", str(fraction), "--out", out,
           "--processes", str(args.processes), "--min-frequency", str(args.min_frequency),
           "--max-words", str(args.max_words)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample():
        # RSS (cheap, /proc/PID/statm) every 20 ms; PSS (smaps_rollup, costlier) every 100 ms.
        root = psutil.Process(proc.pid)
        tick = 0
        while not done.is_set():
            rss = pss = 0
            try:
                for p in [root] + root.children(recursive=True):
                    try:
                        if tick % 5 == 0:
                            m = p.memory_full_info()
                            pss += m.pss
                        else:
                            m = p.memory_info()
                        rss += m.rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            tick += 1
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{kind} build failed ({proc.returncode})")
    stats = json.loads(stdout.strip().splitlines()[-1])
    stats["peak_rss_mib"] = peak["rss"] / 2**20
    stats["peak_pss_mib"] = peak["pss"] / 2**20
    return stats


def chars_per_token(tokenizer_file: str, heldout: str, column: str) -> float:
    from tokenizers import Tokenizer

    from zhlm.tokenizer.word_counts import iter_parquet_texts

    tok = Tokenizer.from_file(tokenizer_file)
    texts = list(iter_parquet_texts(sorted(glob.glob(heldout)), [column]))
    chars = sum(map(len, texts))
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return chars / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="results/split/pretrain/*/*/train.parquet", help="a glob of parquet files")
    ap.add_argument("--heldout", default="results/split/pretrain/*/*/val.parquet", help="a glob of parquet files")
    ap.add_argument("--column", default="text")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--max-words", type=int, default=200_000)
    ap.add_argument("--child", choices=["ours", "bpetrainer"], help=argparse.SUPPRESS)
    ap.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        return _child(args)

    header = (f"{'build':16s} {'M chars':>7s} {'wall s':>6s} {'cpu s':>6s} {'RSS MiB':>7s} {'PSS MiB':>7s} "
              f"{'vocab':>6s} {'chars/tok':>9s}")
    print(header)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, fraction in [("ours 10%", "ours", 0.1), ("ours 100%", "ours", 1.0),
                                     ("BpeTrainer 100%", "bpetrainer", 1.0)]:
            out = os.path.join(tmp, f"{kind}-{fraction}.json")
            st = run_build(kind, args, fraction, out)
            st["chars_per_token"] = chars_per_token(out, args.heldout, args.column)
            results[name] = st
            line = (f"{name:16s} {st['train_chars'] / 1e6:7.2f} {st['seconds']:6.1f} {st['cpu_seconds']:6.1f} "
                    f"{st['peak_rss_mib']:7.0f} {st['peak_pss_mib']:7.0f} {st['vocab_size']:6d} "
                    f"{st['chars_per_token']:9.3f}")
            if kind == "ours":
                line += (f"   count {st['count_seconds']:.1f} s + bpe {st['bpe_seconds']:.1f} s, "
                         f"{st['words']} words")
            print(line, flush=True)

    small, full, base = results["ours 10%"], results["ours 100%"], results["BpeTrainer 100%"]
    print()
    print("RSS: sampled sum over the process tree (counts pages shared after fork once per process);")
    print("PSS: the same with shared pages split between processes (the memory really used).")
    print(f"peak memory, 100% text: {full['peak_pss_mib']:.0f} MiB PSS, {full['peak_rss_mib']:.0f} MiB RSS "
          f"(target <= 300); largest single process {full['maxrss_self_mib']:.0f} MiB")
    print(f"memory growth for {full['train_chars'] / small['train_chars']:.1f}x text: "
          f"{full['peak_pss_mib'] / small['peak_pss_mib']:.2f}x PSS, "
          f"{full['peak_rss_mib'] / small['peak_rss_mib']:.2f}x RSS (target <= 1.5)")
    print(f"compression vs BpeTrainer: {full['chars_per_token']:.3f} / {base['chars_per_token']:.3f} chars/token "
          f"= {full['chars_per_token'] / base['chars_per_token']:.3f}x (target >= 1.1)")
    print(f"build time vs BpeTrainer: {full['seconds']:.1f} s / {base['seconds']:.1f} s wall "
          f"= {full['seconds'] / base['seconds']:.2f}x (target <= 1); "
          f"CPU {full['cpu_seconds']:.1f} s / {base['cpu_seconds']:.1f} s")


if __name__ == "__main__":
    main()
