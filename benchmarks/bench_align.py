"""SFT or DPO recipes side by side: held-out task metrics, forgetting, looping, implicit reward.

    python benchmarks/bench_align.py sft [--results results] [--config config/config.yaml]
        [--pretrain-overrides JSON] [--variants NAME,NAME...] [--device auto] [--out FILE.json]
    python benchmarks/bench_align.py dpo [--results results] ...

Reads a finished run's files under --results (tokens/, tokenizer/, split/; for dpo also sft/,
rollouts/ and tokens/dpo/). sft: pretrains once with the config's `pretrain` settings (plus
--pretrain-overrides), then runs each SFT variant (overrides of the config's `sft` settings,
SFT_VARIANTS) from that model. dpo: runs each DPO variant (DPO_VARIANTS) from results/sft.
Each model is scored as the eval stage scores it: bits per character on held-out pretraining
text (what the stage forgets), the held-out task metrics (greedy answers), the share of looping
answers, and for dpo the implicit-reward accuracy on the held-out pairs against results/sft.
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
from zhlm.train import dpo, pretrain, sft

SFT_VARIANTS = {
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
DPO_VARIANTS = {
    "config": {},
    "sft_weight=0": {"sft_weight": 0.0},
    "sft_weight=0 plain batches": {"sft_weight": 0.0, "group_by_length": False},
    "beta=0.3": {"beta": 0.3},
    "lr=1e-4": {"lr": 1e-4},
}
HEADLINE = (("polarity", "accuracy"), ("segmentation", "f1"), ("pinyin", "exact_match"), ("meaning", "char_f1"),
            ("origin", "char_f1"), ("example", "char_f1"))


def score(model_dir, stage, results: Path, config, device, reference_dir=None, dpo_settings=None) -> dict:
    pairs = []
    if stage == "dpo":
        pairs = [r for r in read_parquets([results / "rollouts/pairs.parquet"]).to_pylist()
                 if r.get("split", "eval") == "eval"]
    result = evaluate_model(
        model_dir, stage=stage, val_texts=iter_parquet_texts(sorted(results.glob("split/pretrain/*/*/val.parquet")),
                                                             ["text"]),
        task_rows=read_parquets(sorted(results.glob("split/sft/*/*/eval.parquet"))).to_pylist()
        if stage != "pretrain" else None, pairs=pairs, reference_dir=reference_dir, dpo_settings=dpo_settings,
        seq_len=config["pretrain"]["seq_len"], settings=config["eval"] | {"device": device})
    row = {"bpc": result["bpc"]["bpc"]}
    if stage != "pretrain":
        for task, metric in HEADLINE:
            row[f"{task}.{metric}"] = result["tasks"].get(task, {}).get(metric)
        row["looping"] = result["looping"]["all"]["share"]
    if "implicit_reward" in result:
        row["implicit_reward.accuracy"] = result["implicit_reward"]["accuracy"]
    return row


def run_sft(args, config, results: Path, tmp: Path) -> list[dict]:
    t0 = time.perf_counter()
    pretrain.run(results / "tokens", results / "tokenizer", tmp / "pretrain", tmp / "ckpt",
                 model_settings=config["model"], progress=False,
                 settings=config["pretrain"] | {"device": args.device} | json.loads(args.pretrain_overrides))
    rows = [{"variant": "pretrained", "train_s": time.perf_counter() - t0,
             **score(tmp / "pretrain", "pretrain", results, config, args.device)}]
    print(json.dumps(rows[-1]), flush=True)
    for name in (args.variants or ",".join(SFT_VARIANTS)).split(","):
        t0 = time.perf_counter()
        sft.run(tmp / "pretrain", results / "tokenizer", results / "tokens/sft", tmp / name, tmp / "ckpt",
                settings=config["sft"] | {"device": args.device} | SFT_VARIANTS[name],
                pretrain_tokens_dir=results / "tokens", progress=False)
        rows.append({"variant": name, "train_s": time.perf_counter() - t0,
                     **score(tmp / name, "sft", results, config, args.device)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_dpo(args, config, results: Path, tmp: Path) -> list[dict]:
    rows = [{"variant": "sft", "train_s": 0.0, **score(results / "sft", "sft", results, config, args.device)}]
    print(json.dumps(rows[-1]), flush=True)
    for name in (args.variants or ",".join(DPO_VARIANTS)).split(","):
        settings = config["dpo"] | {"device": args.device} | DPO_VARIANTS[name]
        t0 = time.perf_counter()
        dpo.run(results / "sft", results / "tokenizer", results / "tokens/dpo", tmp / name, tmp / "ckpt",
                settings=settings, progress=False)
        rows.append({"variant": name, "train_s": time.perf_counter() - t0,
                     **score(tmp / name, "dpo", results, config, args.device, results / "sft", settings)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["sft", "dpo"])
    parser.add_argument("--results", default="results")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--pretrain-overrides", default="{}", help="sft: overrides of the config's pretrain")
    parser.add_argument("--variants", help="comma-separated names (default: all of the stage's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        rows = (run_sft if args.stage == "sft" else run_dpo)(args, config, Path(args.results), Path(tmp))
    keys = ["bpc"] + [f"{t}.{m}" for t, m in HEADLINE] + ["looping", "implicit_reward.accuracy"]
    print("\n| variant | train s | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys))
    for r in rows:
        cells = " | ".join("-" if r.get(k) is None else f"{r[k]:.3f}" for k in keys)
        print(f"| {r['variant']} | {r['train_s']:.0f} | {cells} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
