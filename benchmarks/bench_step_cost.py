"""What a recipe costs per step: the config's pretrain and SFT steps beside AdamW with plain batches,
in fp32 and in bf16 autocast.

    python benchmarks/bench_step_cost.py [--results results] [--config config/config.yaml] [--steps 10]

Times optimizer steps as the training loop runs them (loss, backward, clipping, optimizer) at the
config's model shape and batch, on the run's token files: pretraining windows with the config's
optimizer against AdamW, and SFT batches with the config's optimizer, pretraining mix and
grouping by length against AdamW on plain shuffled batches; the config's steps once more in bf16
autocast (what dtype "auto" picks on a GPU or a CPU with bf16 instructions). The variants
alternate, several rounds, and the median step is reported: on a shared machine only the ratios
mean something.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from zhlm.io import read_json
from zhlm.lm import pad_batch
from zhlm.model import LlamaForCausalLM, ModelConfig
from zhlm.tokenizer.conversations import Conversations
from zhlm.train.batches import Examples, TokenWindows
from zhlm.train.loop import TrainConfig, make_optimizer
from zhlm.train.pretrain import next_token_loss
from zhlm.train.sft import count_conversations, sft_loss, with_mixed_in


def step_seconds(model, optimizer, data, loss_fn, steps: list[int], dtype) -> list[float]:
    times = []
    for step in steps:
        start = time.perf_counter()
        batch = data.global_batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, _ = loss_fn(model, batch)
        (loss / data.count(batch)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--steps", type=int, default=10, help="steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config, results = yaml.safe_load(Path(args.config).read_text()), Path(args.results)
    meta = read_json(results / "tokens/meta.json")["train"]
    model_config = ModelConfig(**config["model"], vocab_size=meta["vocab_size"])
    tokens = np.memmap(results / "tokens/train.bin", dtype=meta["dtype"], mode="r")
    pt, st = config["pretrain"], config["sft"]
    conversations, _ = Conversations(results / "tokens/sft", "train").cut(st["seq_len"] + 1)

    def pretrain_variant(settings):
        cfg = TrainConfig(**settings)
        return cfg, TokenWindows(tokens, cfg.seq_len, cfg.global_batch, cfg.seed), next_token_loss

    def sft_variant(settings):
        cfg = TrainConfig(**settings)
        items = conversations
        if cfg.pretrain_mix:
            items = with_mixed_in(items, cfg.seq_len + 1, cfg.seed, pretrain_tokens_dir=results / "tokens",
                                  pretrain_share=cfg.pretrain_mix)
        data = Examples(items, cfg.global_batch, cfg.seed, lambda b: pad_batch(b, 0), count_conversations,
                        lengths=items.lengths() if cfg.group_by_length else None)
        return cfg, data, sft_loss

    plain = {"optimizer": "adamw", "pretrain_mix": 0.0, "group_by_length": False, "zero_init_out_proj": False}
    variants = {
        "pretrain, AdamW": pretrain_variant(pt | plain),
        "pretrain, the config": pretrain_variant(pt),
        "pretrain, the config, bf16": pretrain_variant(pt | {"dtype": "bf16"}),
        "sft, AdamW, plain batches": sft_variant(st | plain),
        "sft, the config": sft_variant(st),
        "sft, the config, bf16": sft_variant(st | {"dtype": "bf16"}),
    }
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (cfg, data, loss_fn) in variants.items():
            torch.manual_seed(0)
            model = LlamaForCausalLM(model_config)
            optimizer = make_optimizer(model, cfg, torch.device("cpu"))
            steps = list(range(r * 1000, r * 1000 + args.steps + 1))
            times[name] += step_seconds(model, optimizer, data, loss_fn, steps, cfg.dtype)[1:]  # the first warms up
    print(f"{torch.get_num_threads()} threads; median of {args.rounds} x {args.steps} steps\n")
    print("| variant | s/step | vs AdamW | vs the config |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        stage = name.split(",")[0]
        base = times[stage + (", AdamW" if stage == "pretrain" else ", AdamW, plain batches")]
        median = statistics.median(ts)
        print(f"| {name} | {median:.3f} | {median / statistics.median(base):.2f}x "
              f"| {median / statistics.median(times[stage + ', the config']):.2f}x |")


if __name__ == "__main__":
    main()
