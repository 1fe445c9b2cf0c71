"""SFT: ChatML conversations, loss on the assistant's tokens only."""
from __future__ import annotations

import numpy as np
import torch

from zhlm.tokenizer.chat import IGNORE, encode_chat, messages_of


def encode_rows(tokenizer, rows: list[dict], max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, labels) of each row, cut to max_len tokens; rows with no label left are skipped and counted."""
    examples, skipped = [], 0
    for row in rows:
        ids, labels = encode_chat(tokenizer, messages_of(row))
        ids, labels = ids[:max_len], labels[:max_len]
        if all(l == IGNORE for l in labels[1:]):
            skipped += 1
            continue
        examples.append((ids, labels))
    return examples, skipped


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs and next-token labels (IGNORE on padding)."""
    length = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        labels[i, :len(lab) - 1] = torch.tensor(lab[1:])
    return {"input_ids": inputs, "labels": labels}


class Examples:
    """Batches drawn in a fresh shuffled order each epoch; the batch of step s depends only on (seed, s)."""

    def __init__(self, items: list, global_batch: int, seed: int, collate, count=None):
        if not items:
            raise ValueError("no training examples")
        self.items, self.global_batch, self.seed, self.collate = items, global_batch, seed, collate
        self.count = count or count_labels

    def indices(self, step: int) -> list[int]:
        n, out = len(self.items), []
        position = step * self.global_batch
        while len(out) < self.global_batch:
            epoch, offset = divmod(position, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            take = order[offset:offset + self.global_batch - len(out)]
            out.extend(int(i) for i in take)
            position += len(take)
        return out

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.collate([self.items[i] for i in self.indices(step)])


def count_labels(batch) -> int:
    return int((batch["labels"] != IGNORE).sum())
