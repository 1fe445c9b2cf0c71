"""SFT recipes from one pretrained model: held-out task metrics and forgetting, side by side.

    python benchmarks/bench_sft.py [--results results] [--config config/config.yaml]
        [--pretrain-overrides JSON] [--variants NAME,NAME...] [--device auto] [--out FILE.json]

Reads a finished run's files under --results (tokens/, tokens/sft/, tokenizer/, split/):
pretrains once with the config's `pretrain` settings (plus --pretrain-overrides), then runs
each SFT variant (overrides of the config's `sft` settings, see VARIANTS) from that model, and
scores each as the eval stage does: bits per character on held-out pretraining text (what SFT
forgets) and the held-out task metrics (greedy answers, `eval.max_task_items` per task).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from zhlm.eval.run import evaluate_model
from zhlm.io import read_parquets
from zhlm.tokenizer.word_counts import iter_parquet_texts
from zhlm.train import pretrain, sft

VARIANTS = {
    "config": {},
    "lr=1e-3": {"lr": 1e-3},
    "lr=2e-3": {"lr": 2e-3},
    "mix=0.25": {"pretrain_mix": 0.25},
    "lr=1e-3 mix=0.25": {"lr": 1e-3, "pretrain_mix": 0.25},
    "muon": {"optimizer": "muon", "muon_lr": 0.005},
    "steps x2": {"steps": 1000},
    "steps x2 mix=0.25 muon": {"steps": 1000, "pretrain_mix": 0.25, "optimizer": "muon", "muon_lr": 0.005},
    "steps x4 mix=0.25": {"steps": 2000, "pretrain_mix": 0.25},
    "steps x4 mix=0.25 muon": {"steps": 2000, "pretrain_mix": 0.25, "optimizer": "muon", "muon_lr": 0.005},
}
HEADLINE = (("polarity", "accuracy"), ("segmentation", "f1"), ("pinyin", "exact_match"), ("meaning", "char_f1"),
            ("origin", "char_f1"), ("example", "char_f1"))


def score(model_dir, stage, val_files, task_files, config, device) -> dict:
    result = evaluate_model(model_dir, stage=stage, val_texts=iter_parquet_texts(val_files, ["text"]),
                            task_rows=read_parquets(task_files).to_pylist() if stage != "pretrain" else None,
                            seq_len=config["pretrain"]["seq_len"], settings=config["eval"] | {"device": device})
    row = {"bpc": result["bpc"]["bpc"]}
    for task, metric in HEADLINE if stage != "pretrain" else ():
        row[f"{task}.{metric}"] = result["tasks"].get(task, {}).get(metric)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--pretrain-overrides", default="{}")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    results = Path(args.results)
    val_files = sorted(results.glob("split/pretrain/*/*/val.parquet"))
    task_files = sorted(results.glob("split/sft/*/*/eval.parquet"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        pretrain.run(results / "tokens", results / "tokenizer", tmp / "pretrain", tmp / "ckpt",
                     model_settings=config["model"], progress=False,
                     settings=config["pretrain"] | {"device": args.device} | json.loads(args.pretrain_overrides))
        rows.append({"variant": "pretrained", "train_s": time.perf_counter() - t0,
                     **score(tmp / "pretrain", "pretrain", val_files, task_files, config, args.device)})
        print(json.dumps(rows[-1]), flush=True)
        for name in args.variants.split(","):
            t0 = time.perf_counter()
            sft.run(tmp / "pretrain", results / "tokenizer", results / "tokens/sft", tmp / name, tmp / "ckpt",
                    settings=config["sft"] | {"device": args.device} | VARIANTS[name],
                    pretrain_tokens_dir=results / "tokens", progress=False)
            rows.append({"variant": name, "train_s": time.perf_counter() - t0,
                         **score(tmp / name, "sft", val_files, task_files, config, args.device)})
            print(json.dumps(rows[-1]), flush=True)
    keys = ["bpc"] + [f"{t}.{m}" for t, m in HEADLINE]
    print("\n| variant | train s | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys))
    for r in rows:
        cells = " | ".join("-" if r.get(k) is None else f"{r[k]:.3f}" for k in keys)
        print(f"| {r['variant']} | {r['train_s']:.0f} | {cells} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
