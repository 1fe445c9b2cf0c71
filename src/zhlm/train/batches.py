"""Batch sources: what the training loop draws each step's global batch from.

A batch source has two methods (`BatchSource`):

- `global_batch(step)`: the whole global batch of that step, a dict of tensors
  whose first dimension is the batch. It depends only on (seed, step), so a
  resumed run sees exactly the batches an uninterrupted run sees, and every
  process can take its own rows of it.
- `count(batch)`: how many units the stage's loss is summed over in (part of) a
  batch: labelled tokens for pretraining, conversations for SFT, pairs for DPO.
  The loop divides the summed loss by the count of the whole global batch, so the
  gradient does not depend on how the batch is cut into micro-batches and processes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from zhlm.lm import count_labels
from zhlm.train.phases import Phase, phase_at

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    def global_batch(self, step: int) -> Batch: ...

    def count(self, batch: Batch) -> int: ...


class TokenWindows:
    """Random windows of a token file; the windows of step s depend only on (seed, s).

    The file is a memmap: only the windows of a batch are read into memory.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        if tokens.size < seq_len + 2:
            raise ValueError(f"{tokens.size} tokens are too few for windows of {seq_len}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, global_batch, seed

    def global_batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.batch_size)
        return windows_at(self.tokens, starts, self.seq_len)

    def count(self, batch: Batch) -> int:
        return count_labels(batch["labels"])


def windows_at(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """The windows of seq_len + 1 tokens at `starts`: each one's inputs are its first seq_len
    tokens, its labels the last seq_len; both (B, seq_len)."""
    rows = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


class MixtureWindows:
    """Random windows of a token file, its sources drawn by the weights of each step's phase
    (`pretrain.phases`); the windows of step s depend only on (seed, s).

    `spans` maps each source to its [start, end) token spans (binarize's `sources` in meta.json).
    A window lies inside one span, so it never joins the end of one source to the start of
    another, and every start inside a span is equally likely. A phase without a mixture weighs
    every source by its windows, that is by its tokens, as TokenWindows draws them.
    """

    def __init__(self, tokens: np.ndarray, spans: dict[str, list[list[int]]], phases: Sequence[Phase],
                 seq_len: int, global_batch: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed, self.phases = tokens, seq_len, global_batch, seed, phases
        # Per source: its spans' first tokens, and how many windows of seq_len + 1 tokens start in each.
        self.firsts, self.rooms = {}, {}
        for name, runs in spans.items():
            runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
            self.firsts[name], self.rooms[name] = runs[:, 0], np.maximum(0, runs[:, 1] - runs[:, 0] - seq_len)
        self.mixtures = [self.weights(k, phase) for k, phase in enumerate(phases)]

    def weights(self, k: int, phase: Phase) -> tuple[list[str], np.ndarray]:
        """Phase k's sources and their weights, summing to 1."""
        mixture = phase.mixture or {name: float(room.sum()) for name, room in self.rooms.items() if room.sum()}
        for name in mixture:
            if name not in self.rooms:
                raise ValueError(f"pretrain.phases[{k}].mixture names {name!r}, which has no tokens in the token "
                                 f"file: its sources are {', '.join(self.rooms)}")
            if not self.rooms[name].sum():
                raise ValueError(f"pretrain.phases[{k}].mixture names {name!r}, whose text has no span of "
                                 f"seq_len + 1 = {self.seq_len + 1} tokens")
        weights = np.array(list(mixture.values()), dtype=np.float64)
        return list(mixture), weights / weights.sum()

    def windows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The source index (into the phase's mixture) and start of each window of `step`: (B,), (B,)."""
        names, weights = self.mixtures[phase_at(self.phases, step)[0]]
        rng = np.random.default_rng([self.seed, step])
        # Stratified: B evenly spaced points with one random offset, read off the cumulative weights,
        # give every source the floor or the ceiling of B × its weight windows in each batch. The rows
        # come grouped by source; the loss is summed over the global batch, so their order is no matter.
        points = (np.arange(self.batch_size) + rng.random()) / self.batch_size
        which = np.minimum(np.searchsorted(np.cumsum(weights), points, side="right"), len(names) - 1)
        starts = np.empty(self.batch_size, dtype=np.int64)
        for j, name in enumerate(names):
            rows = np.flatnonzero(which == j)
            room, ends = self.rooms[name], np.cumsum(self.rooms[name])
            # A uniform draw over all of the source's window starts, then the span it falls in.
            r = rng.integers(0, ends[-1], size=rows.size)
            span = np.searchsorted(ends, r, side="right")
            starts[rows] = self.firsts[name][span] + r - (ends[span] - room[span])
        return which, starts

    def global_batch(self, step: int) -> Batch:
        return windows_at(self.tokens, self.windows(step)[1], self.seq_len)

    def count(self, batch: Batch) -> int:
        return count_labels(batch["labels"])


class Examples:
    """Items drawn in a fresh shuffled order each epoch; the batch of step s depends only on (seed, s).

    `items` is any sequence: a list, or a view of token files (zhlm.tokenizer.conversations) that
    reads only the items a batch asks for. `collate` turns a list of items into a batch; `count`
    is the stage's loss unit.

    With `lengths` (each item's length), batches are grouped by length: the items of every
    GROUP consecutive batches of the shuffled order are sorted by length, cut into batches
    again, and those batches taken in a shuffled order. A batch is padded to its longest item,
    so similar lengths waste less compute on padding; each epoch still sees every item once.
    """

    GROUP = 64  # batches whose items are sorted together

    def __init__(self, items: Sequence, global_batch: int, seed: int, collate: Callable[[list], Batch],
                 count: Callable[[Batch], int], lengths: np.ndarray | None = None):
        if not items:
            raise ValueError("no training examples")
        self.items, self.batch_size, self.seed, self.collate = items, global_batch, seed, collate
        self.count = count
        self.lengths = None if lengths is None else np.asarray(lengths)

    def shuffled(self, position: int, count: int) -> list[int]:
        """Items [position, position + count) of the endless stream of shuffled epochs."""
        n, out = len(self.items), []
        while len(out) < count:
            epoch, offset = divmod(position, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            take = order[offset:offset + count - len(out)]
            out.extend(int(i) for i in take)
            position += len(take)
        return out

    def indices(self, step: int) -> list[int]:
        if self.lengths is None:
            return self.shuffled(step * self.batch_size, self.batch_size)
        group, k = divmod(step, self.GROUP)
        pool = np.array(self.shuffled(group * self.GROUP * self.batch_size, self.GROUP * self.batch_size))
        batches = pool[np.argsort(self.lengths[pool], kind="stable")].reshape(self.GROUP, self.batch_size)
        order = np.random.default_rng([self.seed, group, 1]).permutation(self.GROUP)
        return [int(i) for i in batches[order[k]]]

    def global_batch(self, step: int) -> Batch:
        return self.collate([self.items[i] for i in self.indices(step)])


class TextWindows:
    """`count` windows of `length` tokens from a token file, as (ids, labels) items with every
    token labelled: pretraining text that SFT mixes in among its conversations. Window i's start
    depends only on (seed, i)."""

    def __init__(self, tokens: np.ndarray, length: int, count: int, seed: int):
        if tokens.size < length + 1:
            raise ValueError(f"{tokens.size} tokens are too few for windows of {length}")
        self.tokens, self.length = tokens, length
        self.starts = np.random.default_rng([seed, length]).integers(0, tokens.size - length, size=count)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.tokens[self.starts[i]:self.starts[i] + self.length], dtype=np.int64)
        return ids, ids

    def lengths(self) -> np.ndarray:
        return np.full(len(self), self.length)


class Concatenated:
    """Several sequences of items as one: item i of the first, then of the next, and so on."""

    def __init__(self, *parts: Sequence):
        self.parts = parts
        self.ends = np.cumsum([len(part) for part in parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[k][i - (int(self.ends[k - 1]) if k else 0)]

    def lengths(self) -> np.ndarray:
        return np.concatenate([part.lengths() for part in self.parts])
