"""Pretraining: next-token prediction on random windows of the token memmap (with
`phases`, windows of its sources by each phase's mixture: zhlm.train.phases)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zhlm.io import read_json
from zhlm.lm import bits_per_character, check_context, lm_loss, stream_nats
from zhlm.model import LlamaForCausalLM, ModelConfig, save_pretrained
from zhlm.train import distributed
from zhlm.train.batches import MixtureWindows, TokenWindows
from zhlm.train.loop import TrainConfig, finish, start, train


def next_token_loss(model, batch):
    """Summed cross-entropy over the window's tokens: TokenWindows counts the same tokens."""
    return lm_loss(model, batch["input_ids"], batch["labels"]), {}


def training_windows(tokens: np.ndarray, meta: dict, cfg: TrainConfig) -> TokenWindows | MixtureWindows:
    """Windows of the whole token file, or with phases of its sources by each phase's mixture."""
    if not cfg.phases:
        return TokenWindows(tokens, cfg.seq_len, cfg.global_batch, cfg.seed)
    if "sources" not in meta:
        raise ValueError("pretrain.phases draw windows source by source, but the token file's meta.json has no "
                         "per-source spans: binarize it again (snakemake -R binarize)")
    return MixtureWindows(tokens, meta["sources"], cfg.phases, cfg.seq_len, cfg.global_batch, cfg.seed)


def run(tokens_dir, tokenizer_dir, out_dir, ckpt_dir, *, model_settings: dict, settings: dict,
        progress: bool = True) -> list[dict]:
    """Pretrain a fresh decoder on tokens_dir/{train,val}.bin; write a HF model folder to out_dir.

    model_settings: ModelConfig fields (the schema's `model`); settings: TrainConfig fields.
    """
    tokens_dir = Path(tokens_dir)
    cfg, device, fingerprint = start(settings, [tokens_dir / "train.bin", tokens_dir / "meta.json"],
                                     extra={"model": model_settings})
    meta = read_json(tokens_dir / "meta.json")
    train_tokens = np.memmap(tokens_dir / "train.bin", dtype=meta["train"]["dtype"], mode="r")
    val_tokens = np.memmap(tokens_dir / "val.bin", dtype=meta["val"]["dtype"], mode="r")
    eot = meta["train"]["eot_id"]
    config = ModelConfig(**model_settings, vocab_size=meta["train"]["vocab_size"],
                         bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    check_context(config, cfg.seq_len)
    model = LlamaForCausalLM(config).to(device)
    if cfg.zero_init_out_proj:
        model.zero_init_out_proj()
    # Validation bits per character: the val set's characters per token converts nats per token.
    chars_per_token = meta["val"].get("characters", 0) / max(1, meta["val"]["tokens"])

    def evaluate(m):
        nats, n = stream_nats(m, val_tokens, cfg.seq_len, max_windows=cfg.eval_windows)
        row = {"val_loss": nats / n}
        if chars_per_token:
            row["val_bpc"] = bits_per_character(nats, n * chars_per_token)
        return row

    history = train(model, training_windows(train_tokens, meta["train"], cfg), next_token_loss, cfg,
                    out_dir=out_dir, ckpt_dir=ckpt_dir, fingerprint=fingerprint, evaluate=evaluate,
                    flops_per_item=model.flops_per_token(cfg.seq_len) * cfg.seq_len, tokens_per_item=cfg.seq_len,
                    progress=progress)
    if distributed.rank() == 0:
        save_pretrained(model, out_dir, tokenizer_dir, eos_token_ids=[config.eos_token_id])
    finish(ckpt_dir)
    distributed.shutdown()
    return history
