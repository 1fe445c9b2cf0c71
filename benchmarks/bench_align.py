"""SFT or DPO recipes side by side: held-out task metrics, forgetting, looping, implicit reward.

    python benchmarks/bench_align.py sft [--results results] [--config config/config.yaml]
        [--pretrain-overrides JSON | --pretrained DIR] [--variants NAME,NAME...] [--device auto]
        [--out FILE.json] [--keep DIR]
    python benchmarks/bench_align.py dpo [--results results] [--sft DIR] ...

Reads a finished run's files under --results (tokens/, tokenizer/, split/; for dpo also sft/,
rollouts/ and tokens/dpo/). sft: pretrains once with the config's `pretrain` settings (plus
--pretrain-overrides; or starts from --pretrained, say results/pretrain), then runs each SFT
variant (overrides of the config's `sft` settings, SFT_VARIANTS) from that model (--keep DIR
keeps each model folder). dpo: runs each DPO variant (DPO_VARIANTS: overrides of the config's
`dpo` settings, and of its `rollouts` settings under "rollouts", which makes new pairs) from
--sft (default results/sft).
Each model is scored as the eval stage scores it: bits per character on held-out pretraining
text (what the stage forgets), the held-out task metrics (greedy answers), the share of looping
answers, and for dpo the implicit-reward accuracy on the held-out pairs against results/sft.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from zhlm.eval.report import paired_changes
from zhlm.eval.run import evaluate_model
from zhlm.io import read_parquets, write_parquet
from zhlm.tokenizer.conversations import tokenize_dpo
from zhlm.tokenizer.word_counts import iter_parquet_texts
from zhlm.train import dpo, pretrain, rollouts, sft

# name -> overrides of the config's settings; "config" is the config as it stands.
SFT_VARIANTS = {
    "config": {},
    "adamw plain": {"optimizer": "adamw", "pretrain_mix": 0.0, "group_by_length": False, "steps": 500},
    "muon_lr=0.0025": {"muon_lr": 0.0025},
    "muon_lr=0.01": {"muon_lr": 0.01},
    "muon_lr=0.02": {"muon_lr": 0.02},
    "muon_lr=0.02 lr=1e-3": {"muon_lr": 0.02, "lr": 1e-3},
    "steps=2000": {"steps": 2000},
    "pretrain_mix=0.1": {"pretrain_mix": 0.1},
    "pretrain_mix=0.15": {"pretrain_mix": 0.15},
    "steps=2000 muon_lr=0.02": {"steps": 2000, "muon_lr": 0.02},
}
DPO_VARIANTS = {
    "config": {},
    "anchor_weight=0": {"anchor_weight": 0.0},
    "anchor_weight=0 sft_weight=1": {"anchor_weight": 0.0, "sft_weight": 1.0},
    "anchor_weight=0 sft_weight=5": {"anchor_weight": 0.0, "sft_weight": 5.0},
    "anchor_weight=1": {"anchor_weight": 1.0},
    "sft_weight=0": {"sft_weight": 0.0},
    "beta=0.3": {"beta": 0.3},
    "lr=1e-4": {"lr": 1e-4},
    "lr=2.5e-5": {"lr": 2.5e-5},
    "steps=50": {"steps": 50},
    "steps=50 lr=1e-4": {"steps": 50, "lr": 1e-4},
    "steps=200": {"steps": 200},
    "sft_weight=3 unlikelihood_weight=0": {"sft_weight": 3.0, "unlikelihood_weight": 0.0},
    "sft_weight=3 unlikelihood_weight=3": {"sft_weight": 3.0, "unlikelihood_weight": 3.0},
    "sft_weight=3 unlikelihood_weight=10": {"sft_weight": 3.0, "unlikelihood_weight": 10.0},
    "sft_weight=6 unlikelihood_weight=10": {"sft_weight": 6.0, "unlikelihood_weight": 10.0},
    "unlikelihood_weight=15": {"unlikelihood_weight": 15.0},
    "sampled rollouts": {"rollouts": {"temperature": 0.8}},
    "3000 prompts steps=300": {"steps": 300, "rollouts": {"max_prompts": 3000}},
    "segmentation prompts too": {"rollouts": {"sources": ["demo_idiom_tasks", "demo_segmentation"]}},
}
HEADLINE = (("polarity", "accuracy"), ("segmentation", "f1"), ("pinyin", "exact_match"), ("meaning", "char_f1"),
            ("origin", "char_f1"), ("example", "char_f1"))


def score(model_dir, stage, results: Path, config, device, reference_dir=None, dpo_settings=None,
          pairs_file=None) -> dict:
    pairs = []
    if stage == "dpo":
        pairs = [r for r in read_parquets([pairs_file or results / "rollouts/pairs.parquet"]).to_pylist()
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
    return row | {"answers": result.get("task_answers", [])}


def noted(row: dict, base: dict | None) -> dict:
    """The row, printed without its answers, with the task changes beyond noise against the base
    row's answers on the same items (zhlm.eval.report.paired_changes)."""
    if base is not None:
        row["beyond_noise"] = "; ".join(f"{c['task']} {c['measure']} {c['mean_change']:+.3f} (SE {c['se']:.3f})"
                                        for c in paired_changes(base["answers"], row["answers"]) if c["beyond_noise"])
    print(json.dumps({k: v for k, v in row.items() if k != "answers"}, ensure_ascii=False), flush=True)
    return row


def run_sft(args, config, results: Path, tmp: Path) -> list[dict]:
    t0 = time.perf_counter()
    base = Path(args.pretrained) if args.pretrained else tmp / "pretrain"
    if not args.pretrained:
        pretrain.run(results / "tokens", results / "tokenizer", base, tmp / "ckpt",
                     model_settings=config["model"], progress=False,
                     settings=config["pretrain"] | {"device": args.device} | json.loads(args.pretrain_overrides))
    rows = [noted({"variant": "pretrained", "train_s": time.perf_counter() - t0,
                   **score(base, "pretrain", results, config, args.device)}, None)]
    for name in (args.variants or ",".join(SFT_VARIANTS)).split(","):
        t0 = time.perf_counter()
        sft.run(base, results / "tokenizer", results / "tokens/sft", tmp / name, tmp / "ckpt",
                settings=config["sft"] | {"device": args.device} | SFT_VARIANTS[name],
                pretrain_tokens_dir=results / "tokens", progress=False)
        rows.append(noted({"variant": name, "train_s": time.perf_counter() - t0,  # against the first variant
                           **score(tmp / name, "sft", results, config, args.device)}, rows[1] if rows[1:] else None))
        if args.keep:
            shutil.copytree(tmp / name, Path(args.keep) / name.replace(" ", "_"),
                            ignore=shutil.ignore_patterns("_ckpt"), dirs_exist_ok=True)
    return rows


def make_pairs(sft_dir: Path, results: Path, config, overrides: dict, device, out: Path) -> tuple[Path, Path]:
    """New rollouts of the SFT model with the config's rollout settings plus overrides, and their
    token files; returns (pairs file, token folder)."""
    pairs, stats = rollouts.run(sft_dir, sorted(results.glob("split/sft/*/*/dpo_prompts.parquet")),
                                settings=config["rollouts"] | {"device": device} | overrides, progress=False)
    print(json.dumps({"rollouts": overrides, **stats}), flush=True)
    write_parquet(pairs, out / "pairs.parquet")
    tokenize_dpo([out / "pairs.parquet"], [], results / "tokenizer/tokenizer.json", out / "tokens")
    return out / "pairs.parquet", out / "tokens"


def run_dpo(args, config, results: Path, tmp: Path) -> list[dict]:
    sft_dir = Path(args.sft or results / "sft")
    rows = [noted({"variant": "sft", "train_s": 0.0, **score(sft_dir, "sft", results, config, args.device)}, None)]
    made: dict[str, tuple[Path, Path]] = {}  # rollout overrides -> (pairs, tokens), made once
    for name in (args.variants or ",".join(DPO_VARIANTS)).split(","):
        overrides = dict(DPO_VARIANTS[name])
        rollout_overrides = overrides.pop("rollouts", {})
        key = json.dumps(rollout_overrides, sort_keys=True)
        if key not in made:
            made[key] = make_pairs(sft_dir, results, config, rollout_overrides, args.device, tmp / f"pairs{len(made)}")
        pairs_file, tokens = made[key]
        settings = config["dpo"] | {"device": args.device} | overrides
        t0 = time.perf_counter()
        dpo.run(sft_dir, results / "tokenizer", tokens, tmp / name, tmp / "ckpt", settings=settings,
                sft_tokens_dir=results / "tokens/sft", progress=False)
        rows.append(noted({"variant": name, "train_s": time.perf_counter() - t0,
                           **score(tmp / name, "dpo", results, config, args.device, sft_dir, settings, pairs_file)},
                          rows[0]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["sft", "dpo"])
    parser.add_argument("--results", default="results")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--pretrain-overrides", default="{}", help="sft: overrides of the config's pretrain")
    parser.add_argument("--pretrained", help="sft: start from this pretrained model folder instead of pretraining")
    parser.add_argument("--variants", help="comma-separated names (default: all of the stage's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", help="sft: keep each variant's model folder under this folder")
    parser.add_argument("--sft", help="dpo: the SFT model folder (default: RESULTS/sft)")
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
        if r.get("beyond_noise") is not None:
            print(f"|   beyond noise against {rows[0 if args.stage == 'dpo' else 1]['variant']}: "
                  f"{r['beyond_noise'] or 'nothing'} |")
    if args.out:
        Path(args.out).write_text(json.dumps([{k: v for k, v in r.items() if k != "answers"} for r in rows],
                                             indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
