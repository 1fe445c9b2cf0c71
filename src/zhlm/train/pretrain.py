"""Pretraining: next-token prediction on windows of the token memmap."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zhlm.io import read_json
from zhlm.model import LlamaModel, ModelConfig, save_pretrained
from zhlm.train import distributed
from zhlm.train.loop import finish, start, train

IGNORE = -100


class TokenWindows:
    """Random windows of a token file; the windows of step s depend only on (seed, s).

    The file is a memmap: only the windows of a batch are read into memory.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        if tokens.size < seq_len + 2:
            raise ValueError(f"{tokens.size} tokens are too few for windows of {seq_len}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, global_batch, seed

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.batch_size)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    @staticmethod
    def count(batch) -> int:
        return int((batch["labels"] != IGNORE).sum())


def lm_loss(model, batch):
    """Summed cross-entropy over the labelled tokens, and their count."""
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum()), {}


@torch.no_grad()
def stream_nats(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, max_windows: int | None = None
                ) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of a token stream, in consecutive windows.

    Each window predicts its tokens from the ones before it in the window; the
    first token of the stream is not predicted. With max_windows, that many
    windows evenly spread over the stream. Returns (nats, tokens predicted).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_windows = math.ceil((tokens.size - 1) / seq_len)
    chosen = np.arange(n_windows)
    if max_windows is not None and max_windows < n_windows:
        # Spread over the whole stream: the file holds its sources one after another.
        chosen = np.unique(np.linspace(0, n_windows - 1, max_windows).astype(np.int64))
    nats, count = 0.0, 0
    for first in range(0, len(chosen), batch_size):
        windows = []
        for w in chosen[first:first + batch_size]:
            chunk = np.asarray(tokens[w * seq_len: w * seq_len + seq_len + 1], dtype=np.int64)
            windows.append(torch.from_numpy(chunk))
        length = max(len(c) for c in windows)
        rows = torch.full((len(windows), length), IGNORE, dtype=torch.long)
        for i, c in enumerate(windows):
            rows[i, :len(c)] = c
        inputs = rows[:, :-1].clamp(min=0).to(device)
        labels = rows[:, 1:].to(device)
        loss, n, _ = lm_loss(model, {"input_ids": inputs, "labels": labels})
        nats += loss.item()
        count += n
    model.train(was_training)
    return nats, count


def check_context(config: ModelConfig, seq_len: int) -> None:
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context window "
                         f"(max_position_embeddings {config.max_position_embeddings})")


def bits_per_character(nats: float, characters: int) -> float:
    return nats / math.log(2) / characters


def run(tokens_dir, tokenizer_dir, out_dir, ckpt_dir, *, model_settings: dict, settings: dict,
        progress: bool = True) -> list[dict]:
    """Pretrain a fresh decoder on tokens_dir/{train,val}.bin; write a HF model folder to out_dir.

    settings: TrainConfig fields plus seq_len and eval_windows (validation windows per evaluation).
    """
    tokens_dir = Path(tokens_dir)
    cfg, device, fingerprint = start({**settings, "model": model_settings},
                                     [tokens_dir / "train.bin", tokens_dir / "meta.json"])
    meta = read_json(tokens_dir / "meta.json")
    seq_len = settings["seq_len"]
    train_tokens = np.memmap(tokens_dir / "train.bin", dtype=meta["train"]["dtype"], mode="r")
    val_tokens = np.memmap(tokens_dir / "val.bin", dtype=meta["val"]["dtype"], mode="r")
    eot = meta["train"]["eot_id"]
    config = ModelConfig(**{"max_position_embeddings": seq_len, **model_settings},
                         vocab_size=meta["train"]["vocab_size"], bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    check_context(config, seq_len)
    model = LlamaModel(config).to(device)
    # Validation bits per character: the val set's characters per token converts nats per token.
    chars_per_token = meta["val"].get("characters", 0) / max(1, meta["val"]["tokens"])

    def evaluate(m):
        nats, n = stream_nats(m, val_tokens, seq_len, max_windows=settings.get("eval_windows", 32))
        row = {"val_loss": nats / n}
        if chars_per_token:
            row["val_bpc"] = nats / n / math.log(2) / chars_per_token
        return row

    history = train(model, TokenWindows(train_tokens, seq_len, cfg.global_batch, cfg.seed), lm_loss, cfg,
                    out_dir=out_dir, ckpt_dir=ckpt_dir, fingerprint=fingerprint, evaluate=evaluate,
                    flops_per_item=model.flops_per_token(seq_len) * seq_len, tokens_per_item=seq_len,
                    progress=progress)
    if distributed.rank() == 0:
        save_pretrained(model, out_dir, tokenizer_dir, eos_token_ids=[config.eos_token_id])
    finish(ckpt_dir)
    distributed.shutdown()
    return history
