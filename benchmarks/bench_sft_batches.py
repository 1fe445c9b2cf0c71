"""Memory and time of SFT's batches: every conversation tokenised into lists (the old path)
beside the memmapped token files of `tokenize_sft`.

    python benchmarks/bench_sft_batches.py [--conversations 200000 --seq-len 256
                                            --global-batch 32 --steps 200 --tokenizer PATH]

Builds N synthetic conversations from real demo text (zhlm.data.demo: idiom questions,
review polarity, word segmentation, cycled with fresh ids) into a parquet file. Each way runs
in its own subprocess, so its peak RSS (VmHWM) is its own:

- lists: read the split, `encode_chats` every row into Python lists cut to seq_len + 1,
  `Examples` over them: what every rank of `zhlm.train.sft.run` held before token files;
- tokenize: `tokenize_sft` writing the token files (the one-off stage, streaming);
- token files: open them (`Conversations.cut`) and draw batches through the same `Examples`.

Both draw the same `--steps` global batches and print a checksum of them, which must agree.
Without --tokenizer, a 2000-token BPE is built from demo reviews.

On a busy 2-core machine, 200k conversations (16.7M tokens): lists 57 s and 3.4 GB over
the baseline (torch imported); tokenize_sft 38 s and 0.15 GB; token files 0.8 s and 0.06 GB
(mostly the memmapped pages the batches touched), the same batches.
"""
import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from zhlm.data import demo
from zhlm.io import write_parquet


def conversations(n: int) -> list[dict]:
    rows = demo.idiom_tasks() + demo.polarity() + demo.segmentation()
    return [{"id": f"{rows[i % len(rows)]['id']}#{i // len(rows)}", "source": "bench",
             "prompt": rows[i % len(rows)]["prompt"], "response": rows[i % len(rows)]["response"]}
            for i in range(n)]


def draw(examples, args) -> str:
    """Checksum of the first --steps global batches drawn from `examples` as SFT draws them."""
    from zhlm.lm import pad_batch
    from zhlm.train.batches import Examples
    from zhlm.train.sft import count_conversations

    data = Examples(examples, args.global_batch, 1234, lambda b: pad_batch(b, 0), count_conversations)
    digest = hashlib.sha256()
    for step in range(args.steps):
        batch = data.global_batch(step)
        digest.update(batch["input_ids"].numpy().tobytes())
        digest.update(batch["labels"].numpy().tobytes())
    return digest.hexdigest()[:16]


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss keeps the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> dict:
    """One way, in this process: its wall time, peak RSS and batch checksum."""
    import torch  # noqa: F401  (imported by every way, so the baseline counts it)

    from zhlm.tokenizer.chat import IGNORE
    start = time.perf_counter()
    out = {}
    max_len = args.seq_len + 1
    if args.child == "lists":
        from tokenizers import Tokenizer

        from zhlm.io import read_parquets
        from zhlm.tokenizer.chat import encode_chats, messages_of
        tokenizer = Tokenizer.from_file(args.tokenizer)
        rows = read_parquets(args.data).to_pylist()
        examples = []
        for ids, labels in encode_chats(tokenizer, [messages_of(r) for r in rows]):
            ids, labels = ids[:max_len], labels[:max_len]
            if any(label != IGNORE for label in labels[1:]):
                examples.append((ids, labels))
        out["checksum"] = draw(examples, args)
    elif args.child == "tokenize":
        from zhlm.tokenizer.conversations import tokenize_sft
        tokenize_sft(args.data, [], args.tokenizer, args.tokens, batch_size=1024)
    elif args.child == "token files":
        from zhlm.tokenizer.conversations import Conversations
        examples, _ = Conversations(args.tokens, "train").cut(max_len)
        out["checksum"] = draw(examples, args)
    out["wall_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_child(name: str, args, data: Path, tokens: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--tokens", str(tokens),
           "--tokenizer", args.tokenizer, "--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch),
           "--steps", str(args.steps)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=200_000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokenizer")
    ap.add_argument("--child")
    ap.add_argument("--data")
    ap.add_argument("--tokens")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.tokenizer:
            from zhlm.tokenizer.bpe import build_from_texts, save_tokenizer
            tokenizer, _, _ = build_from_texts([r["text"] for r in demo.reviews()[:3000]], 2000)
            save_tokenizer(tokenizer, tmp / "tokenizer")
            args.tokenizer = str(tmp / "tokenizer/tokenizer.json")
        data = tmp / "train.parquet"
        write_parquet(pa.Table.from_pylist(conversations(args.conversations)), data)
        parquet_mb = data.stat().st_size / 1e6
        tokens = tmp / "tokens"
        ways = {name: run_child(name, args, data, tokens) for name in ("baseline", "lists", "tokenize", "token files")}
        meta = json.loads((tokens / "meta.json").read_text())
        disk_mb = sum(p.stat().st_size for p in tokens.iterdir()) / 1e6

    print(f"{args.conversations} conversations ({parquet_mb:.1f} MB parquet), {meta['train']['tokens']:,} tokens, "
          f"token files {disk_mb:.0f} MB; seq_len {args.seq_len}, "
          f"{args.steps} batches of {args.global_batch}")
    print(f"{'way':<13} {'wall s':>8} {'peak RSS MB':>12} {'over baseline MB':>17}  checksum")
    base = ways["baseline"]["peak_rss_mb"]
    for name, w in ways.items():
        print(f"{name:<13} {w['wall_s']:>8.1f} {w['peak_rss_mb']:>12.0f} {w['peak_rss_mb'] - base:>17.0f}  "
              f"{w.get('checksum', '')}")
    assert ways["lists"]["checksum"] == ways["token files"]["checksum"], "the two ways drew different batches"


if __name__ == "__main__":
    main()
