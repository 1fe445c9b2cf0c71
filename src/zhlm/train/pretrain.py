"""Pretraining: next-token prediction on windows of the token memmap."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


class TokenWindows:
    """Random windows of a token file; the windows of step s depend only on (seed, s).

    The file is a memmap: only the windows of a batch are read into memory.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        if tokens.size < seq_len + 2:
            raise ValueError(f"{tokens.size} tokens are too few for windows of {seq_len}")
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.global_batch)
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
    first token of the stream is not predicted. Returns (nats, tokens predicted).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_windows = math.ceil((tokens.size - 1) / seq_len)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    nats, count = 0.0, 0
    for first in range(0, n_windows, batch_size):
        windows = []
        for w in range(first, min(first + batch_size, n_windows)):
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


def bits_per_character(nats: float, characters: int) -> float:
    return nats / math.log(2) / characters
