"""What scores a language model: the LM loss, sequence log-probabilities, nats over a
token stream, bits per character, and the padding they all share.

Training (pretrain, SFT, DPO) and eval both score through this module, so a
number means the same thing wherever it is computed. Labels are the next-token
targets aligned with the inputs; positions labelled IGNORE carry no loss.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from zhlm.model import ModelConfig
from zhlm.tokenizer.chat import IGNORE

__all__ = ["IGNORE", "pad_batch", "lm_loss", "count_labels", "token_logp", "sequence_logp", "sequence_scores",
           "stream_nats", "check_context", "bits_per_character"]


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, labels) examples -> right-padded inputs and next-token labels, both (B, T).

    T is the longest example's length minus one: row i predicts ids[1:] from
    ids[:-1]. Padding is `pad_id` in the inputs and IGNORE in the labels.
    """
    length = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        labels[i, :len(lab) - 1] = torch.tensor(lab[1:])
    return {"input_ids": inputs, "labels": labels}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T) of the labels (B, T) under logits (B, T, V); 0 on IGNORE.

    The cross-entropy runs in float32 whatever the autocast dtype: a bf16 softmax
    over a large vocabulary loses too much precision.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="none").view(labels.shape)


def lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (nats, a scalar) over the labelled tokens of (B, T) inputs and labels."""
    logits = model(input_ids)  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def count_labels(labels: torch.Tensor) -> int:
    """Tokens that carry loss."""
    return int((labels != IGNORE).sum())


def token_logp(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability (B, T) of each label of (B, T) inputs and labels; 0 on IGNORE."""
    logits = model(input_ids).float()  # (B, T, V)
    mask = labels != IGNORE
    # IGNORE is not an index: gather at 0 there, and the mask zeroes it.
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (B, T)
    return logp * mask


def sequence_logp(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability (B,) of the labelled tokens of each row of (B, T) inputs and labels."""
    return token_logp(model, input_ids, labels).sum(-1)


@torch.no_grad()
def sequence_scores(model, examples: list[tuple[list[int], list[int]]], pad_id: int,
                    batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed log-prob of the labelled tokens, their count) of each (ids, labels) example.

    Examples are batched by length to waste little on padding; right padding
    does not change the log-probs of the tokens before it.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        padded = pad_batch([examples[i] for i in batch], pad_id)
        logp = sequence_logp(model, padded["input_ids"].to(device), padded["labels"].to(device))
        counts = (padded["labels"] != IGNORE).sum(-1)
        for i, lp, n in zip(batch, logp.tolist(), counts.tolist()):
            out[i] = (lp, n)
    model.train(was_training)
    return out


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
        # Window w covers tokens [w·seq_len, (w+1)·seq_len]: seq_len inputs, their seq_len next tokens.
        # The last window may be shorter; IGNORE pads it.
        windows = [torch.from_numpy(np.asarray(tokens[w * seq_len: w * seq_len + seq_len + 1], dtype=np.int64))
                   for w in chosen[first:first + batch_size]]
        rows = torch.full((len(windows), max(len(c) for c in windows)), IGNORE, dtype=torch.long)
        for i, c in enumerate(windows):
            rows[i, :len(c)] = c
        inputs = rows[:, :-1].clamp(min=0).to(device)  # (B, T); padding becomes token 0, never a label
        labels = rows[:, 1:].to(device)
        nats += lm_loss(model, inputs, labels).item()
        count += count_labels(labels)
    model.train(was_training)
    return nats, count


def check_context(config: ModelConfig, seq_len: int) -> None:
    """A stage's windows must fit the model's context: positions past it were never trained."""
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context window "
                         f"(max_position_embeddings {config.max_position_embeddings})")


def bits_per_character(nats: float, characters: int) -> float:
    """Nats over a text -> bits per character: comparable across tokenizers, unlike loss per token."""
    return nats / math.log(2) / characters
