"""Pretraining recipes at equal compute, beside a GPT-2-style baseline.

    python benchmarks/bench_pretrain.py [--tokens results/tokens] [--config config/config.yaml]
        [--recipes NAME,NAME...] [--device auto] [--dtype fp32] [--out FILE.json]
    python benchmarks/bench_pretrain.py --model results/pretrain [--tokens results/tokens]

Every run trains on the same token files with the config's pretrain settings (steps, batch,
sequence length: the same windows in the same order, so the same tokens seen) and the config's
depth and width, through zhlm's own training loop, and is scored on all of val.bin in windows
of the training length, as bits per character (which do not depend on the tokenizer).

--model scores a trained model folder the same way (the DAG's pretrain, say) and trains nothing.

The baseline is nanoGPT's GPT-2 model (learned positions, LayerNorm, a GELU MLP four times the
width, tied embeddings, residual projections initialised at 0.02/sqrt(2·layers)) with its
AdamW/cosine recipe, at the best of two learning rates. zhlm's recipes are overrides of the
config's `pretrain` settings (see RECIPES).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from zhlm.io import read_json
from zhlm.lm import bits_per_character, stream_nats
from zhlm.model import LlamaForCausalLM, ModelConfig, load_model
from zhlm.train.batches import TokenWindows
from zhlm.train.loop import TrainConfig, train
from zhlm.train.pretrain import next_token_loss

# name -> overrides of the config's pretrain settings. "config" is the config as it stands.
RECIPES = {
    "config": {},
    "adamw": {"optimizer": "adamw", "zero_init_out_proj": False, "schedule": "cosine"},
    "adamw+zero_init": {"optimizer": "adamw", "zero_init_out_proj": True, "schedule": "cosine"},
    "adamw+wsd": {"optimizer": "adamw", "zero_init_out_proj": False, "schedule": "wsd", "decay_fraction": 0.4},
    "muon": {"optimizer": "muon", "zero_init_out_proj": False, "schedule": "cosine"},
    "muon+zero_init": {"optimizer": "muon", "zero_init_out_proj": True, "schedule": "cosine"},
    "muon+zero_init+wsd": {"optimizer": "muon", "zero_init_out_proj": True, "schedule": "wsd",
                           "decay_fraction": 0.4},
    "muon+zero_init+wsd muon_lr=0.01": {"optimizer": "muon", "zero_init_out_proj": True, "schedule": "wsd",
                                        "decay_fraction": 0.4, "muon_lr": 0.01},
    "muon+zero_init+wsd muon_lr=0.04": {"optimizer": "muon", "zero_init_out_proj": True, "schedule": "wsd",
                                        "decay_fraction": 0.4, "muon_lr": 0.04},
    "muon+zero_init+wsd lr=0.006": {"optimizer": "muon", "zero_init_out_proj": True, "schedule": "wsd",
                                    "decay_fraction": 0.4, "lr": 0.006},
}
GPT2_LRS = (1e-3, 3e-3)


class GPT2Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.attn_proj = nn.Linear(width, width, bias=False)
        self.c_fc = nn.Linear(width, 4 * width, bias=False)
        self.mlp_proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    """nanoGPT's model (bias=False, no dropout): forward(input_ids (B, T)) -> logits (B, T, V)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.h = nn.ModuleList(GPT2Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def run(model, settings: dict, tokens_dir: Path, device) -> dict:
    """Train `model` on the token files with these settings; bits per character on all of val.bin."""
    meta = read_json(tokens_dir / "meta.json")
    train_tokens = np.memmap(tokens_dir / "train.bin", dtype=meta["train"]["dtype"], mode="r")
    cfg = TrainConfig(**settings)
    torch.manual_seed(cfg.seed)
    model = model().to(device)
    if cfg.zero_init_out_proj:
        model.zero_init_out_proj()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train(model, TokenWindows(train_tokens, cfg.seq_len, cfg.global_batch, cfg.seed), next_token_loss, cfg,
              out_dir=Path(tmp), ckpt_dir=Path(tmp) / "_ckpt", progress=False)
    seconds = time.perf_counter() - start
    return {"bpc": val_bpc(model, tokens_dir, cfg.seq_len), "train_s": seconds,
            "tokens_seen": cfg.steps * cfg.global_batch * cfg.seq_len,
            "parameters": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def val_bpc(model, tokens_dir: Path, seq_len: int) -> float:
    """Bits per character on all of val.bin, in windows of seq_len tokens."""
    meta = read_json(tokens_dir / "meta.json")["val"]
    val_tokens = np.memmap(tokens_dir / "val.bin", dtype=meta["dtype"], mode="r")
    nats, n = stream_nats(model.eval(), val_tokens, seq_len, batch_size=32)
    return bits_per_character(nats, n * meta["characters"] / meta["tokens"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="results/tokens")
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", help="fp32 makes GPU runs comparable with CPU ones")
    parser.add_argument("--steps", type=int, help="override the config's steps (a quick look)")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--model", help="only score this trained model folder on all of val.bin")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    tokens_dir = Path(args.tokens)
    if args.model:
        bpc = val_bpc(load_model(args.model), tokens_dir, config["pretrain"]["seq_len"])
        print(f"{args.model}: {bpc:.3f} bits per character on all of val.bin")
        return
    meta = read_json(tokens_dir / "meta.json")
    vocab = meta["train"]["vocab_size"]
    settings = config["pretrain"] | {"device": args.device, "dtype": args.dtype}
    if args.steps:
        settings |= {"steps": args.steps, "warmup_steps": min(settings.get("warmup_steps", 20), args.steps // 2)}
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    shape = config["model"]
    eot = meta["train"]["eot_id"]
    llama = ModelConfig(**shape, vocab_size=vocab, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    print(f"{settings['steps']} steps x {settings['global_batch']} x {settings['seq_len']} tokens; "
          f"{shape['num_hidden_layers']} layers, width {shape['hidden_size']}, vocab {vocab}; {device}")

    results = []
    for lr in GPT2_LRS:
        r = run(lambda: GPT2(vocab, shape["hidden_size"], shape["num_hidden_layers"],
                             shape["num_attention_heads"], settings["seq_len"]),
                settings | {"lr": lr, "optimizer": "adamw", "schedule": "cosine", "zero_init_out_proj": False},
                tokens_dir, device)
        results.append({"recipe": f"gpt2 lr={lr:g}", **r})
        print(json.dumps(results[-1]), flush=True)
    baseline = min(r["bpc"] for r in results)
    for name in args.recipes.split(","):
        r = run(lambda: LlamaForCausalLM(llama), settings | RECIPES[name], tokens_dir, device)
        results.append({"recipe": name, **RECIPES[name], **r})
        print(json.dumps(results[-1]), flush=True)

    print("\n| recipe | params | tokens seen | train s | val bpc | vs GPT-2 best |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['recipe']} | {r['parameters']:,} | {r['tokens_seen']:,} | {r['train_s']:.0f} | {r['bpc']:.3f} "
              f"| {100 * (r['bpc'] / baseline - 1):+.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
