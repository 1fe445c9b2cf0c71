"""ChatML conversations as token files: tokenised once, then read example by example from memmaps.

One set of files per prefix (train, eval, train.chosen, ...) in a folder:

  {prefix}.ids.bin           token ids of every example, one after another (uint16, or uint32)
  {prefix}.mask.bin          uint8 per token: 1 where it carries loss (the assistant's answers)
  {prefix}.offsets.npy       int64 (n + 1,): example i is tokens [offsets[i], offsets[i + 1])
  {prefix}.answer_start.npy  int64 (n,): position of the first token after the first that carries loss
  {prefix}.by_id.npy         int64 (n,): the examples in order of their row id (eval splits only)

Examples are stored whole: a stage cuts each to its seq_len + 1 tokens when it reads it
(`Conversations.cut`), so changing a stage's seq_len does not re-tokenise. Rows with no answer
token at all are never trainable and are left out when writing; meta.json counts them.
"""
from __future__ import annotations

import copy
import os
from array import array
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from zhlm.io import as_paths, atomic_path, read_json, sha256_file, write_json
from zhlm.tokenizer.binarize import token_dtype
from zhlm.tokenizer.chat import IGNORE, encode_chats, messages_of

NO_ANSWER = "no_answer_token"  # the reason a row is left out
TOKEN_FILES = ("ids.bin", "mask.bin", "offsets.npy", "answer_start.npy")  # per prefix, as in the docstring
BY_ID_FILE = "by_id.npy"                                                  # per prefix written with order_by_id


def parquet_batches(paths, batch_size: int) -> Iterator[list[dict]]:
    """The rows of parquet files (in order) as lists of at most batch_size dicts: bounded memory."""
    for path in as_paths(paths):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            yield batch.to_pylist()


class ConversationWriter:
    """Appends (ids, labels) examples to the token files of one prefix; `close` writes the index files."""

    def __init__(self, folder, prefix: str, dtype: np.dtype, *, order_by_id: bool = False):
        self.folder, self.prefix, self.dtype = Path(folder), prefix, np.dtype(dtype)
        self._stack = ExitStack()
        self._ids = self._stack.enter_context(open(self._stack.enter_context(
            atomic_path(self.path("ids.bin"))), "wb"))
        self._mask = self._stack.enter_context(open(self._stack.enter_context(
            atomic_path(self.path("mask.bin"))), "wb"))
        self.offsets, self.answer_starts = array("q", [0]), array("q")
        self.row_ids: list[str] | None = [] if order_by_id else None
        self.skipped = {NO_ANSWER: 0}

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.prefix}.{suffix}"

    def add(self, ids: list[int], labels: list[int], row_id: str | None = None) -> bool:
        """Append one example; False (and counted) when no token after the first carries loss."""
        mask = np.asarray(labels) != IGNORE            # (T,)
        answer = np.flatnonzero(mask[1:])
        if not answer.size:
            self.skipped[NO_ANSWER] += 1
            return False
        np.asarray(ids, dtype=self.dtype).tofile(self._ids)
        mask.astype(np.uint8).tofile(self._mask)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.answer_starts.append(int(answer[0]) + 1)
        if self.row_ids is not None:
            self.row_ids.append(row_id)
        return True

    def close(self) -> dict:
        """Finish the files; return this prefix's meta entry."""
        self._stack.close()  # the .bin files are renamed into place here
        index = {"offsets.npy": np.frombuffer(self.offsets, dtype=np.int64),
                 "answer_start.npy": np.frombuffer(self.answer_starts, dtype=np.int64)}
        if self.row_ids is not None:
            index[BY_ID_FILE] = np.argsort(np.asarray(self.row_ids, dtype=str), kind="stable").astype(np.int64)
        for suffix, values in index.items():
            with atomic_path(self.path(suffix)) as tmp, open(tmp, "wb") as f:
                np.save(f, values)
        return {"examples": len(self.answer_starts), "tokens": int(self.offsets[-1]), "skipped": dict(self.skipped)}


def _tokenizer_meta(tokenizer_file) -> tuple[Tokenizer, dict]:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    return tokenizer, {"dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size,
                       "tokenizer_sha256": sha256_file(tokenizer_file)}


def tokenize_sft(train_files, eval_files, tokenizer_file, out_dir, *, batch_size: int = 1024) -> dict:
    """Encode the SFT splits into out_dir/{train,eval}.* token files and meta.json; return the meta.

    Rows stream through in batches of batch_size; the eval split is also indexed by row id
    (the validation loss takes its first eval_examples in id order).
    """
    tokenizer, meta = _tokenizer_meta(tokenizer_file)
    for split, files in (("train", train_files), ("eval", eval_files)):
        writer = ConversationWriter(out_dir, split, meta["dtype"], order_by_id=split == "eval")
        for rows in parquet_batches(files, batch_size):
            for row, (ids, labels) in zip(rows, encode_chats(tokenizer, [messages_of(r) for r in rows])):
                writer.add(ids, labels, row["id"])
        meta[split] = writer.close()
    write_json(meta, Path(out_dir) / "meta.json")
    return meta


def tokenize_dpo(pair_files, eval_files, tokenizer_file, out_dir, *, batch_size: int = 1024) -> dict:
    """Encode preference pairs into out_dir/{train,eval}.{chosen,rejected}.* token files and meta.json.

    pair_files: parquet files of (id, prompt, chosen, rejected[, split]); rows with split == "eval",
    then every row of eval_files, are the held-out pairs. A pair is left out when either of its
    answers has no token that carries loss; the chosen and rejected files keep the same examples.
    """
    tokenizer, meta = _tokenizer_meta(tokenizer_file)
    writers = {split: {side: ConversationWriter(out_dir, f"{split}.{side}", meta["dtype"])
                       for side in ("chosen", "rejected")} for split in ("train", "eval")}
    skipped = {"train": {NO_ANSWER: 0}, "eval": {NO_ANSWER: 0}}

    def add(rows: list[dict], split_of) -> None:
        encoded = {side: encode_chats(tokenizer, [messages_of({**r, "response": r[side]}) for r in rows])
                   for side in ("chosen", "rejected")}
        for row, chosen, rejected in zip(rows, encoded["chosen"], encoded["rejected"]):
            split = split_of(row)
            if not all(any(label != IGNORE for label in labels[1:]) for _, labels in (chosen, rejected)):
                skipped[split][NO_ANSWER] += 1
                continue
            writers[split]["chosen"].add(*chosen)
            writers[split]["rejected"].add(*rejected)

    for rows in parquet_batches(pair_files, batch_size):
        add(rows, lambda r: "eval" if r.get("split") == "eval" else "train")
    for rows in parquet_batches(eval_files, batch_size):
        add(rows, lambda r: "eval")
    for split, sides in writers.items():
        parts = {side: writer.close() for side, writer in sides.items()}
        meta[split] = {"pairs": parts["chosen"]["examples"], "skipped": skipped[split],
                       **{f"{side}_tokens": part["tokens"] for side, part in parts.items()}}
    write_json(meta, Path(out_dir) / "meta.json")
    return meta


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    """A read-only memmap of a token file (an empty array for an empty file, which cannot be mapped)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


class Conversations:
    """The examples of one prefix's token files; example i is (ids, labels), int64 arrays from the memmaps.

    With max_len, each example is cut to its first max_len tokens and only those with an answer
    token within the cut remain (`cut`). Only the examples asked for are read.
    """

    def __init__(self, folder, prefix: str, dtype: str | None = None):
        folder = Path(folder)
        dtype = dtype or read_json(folder / "meta.json")["dtype"]
        self.tokens = _memmap(folder / f"{prefix}.ids.bin", np.dtype(dtype))
        self.mask = _memmap(folder / f"{prefix}.mask.bin", np.dtype(np.uint8))
        self.offsets = np.load(folder / f"{prefix}.offsets.npy")              # (n + 1,)
        self.answer_start = np.load(folder / f"{prefix}.answer_start.npy")    # (n,)
        by_id = folder / f"{prefix}.{BY_ID_FILE}"
        self.by_id = np.load(by_id) if by_id.exists() else None
        self.index = np.arange(len(self.answer_start))   # which stored examples this view holds
        self.max_len: int | None = None
        if self.tokens.size != self.offsets[-1] or self.mask.size != self.tokens.size:
            raise ValueError(f"{folder}/{prefix}: token, mask and offset files disagree")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        j = self.index[i]
        start, end = int(self.offsets[j]), int(self.offsets[j + 1])
        if self.max_len is not None:
            end = min(end, start + self.max_len)
        ids = np.asarray(self.tokens[start:end], dtype=np.int64)                   # (T,)
        labels = np.where(self.mask[start:end].astype(bool), ids, IGNORE)           # (T,)
        return ids, labels

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        """Tokens of each example of the view, (n,), after the cut."""
        lengths = np.diff(self.offsets)[self.index]
        return lengths if self.max_len is None else np.minimum(lengths, self.max_len)

    def select(self, index: Iterable[int]) -> Conversations:
        """A view of some of this view's examples, in the given order (the memmaps are shared)."""
        view = copy.copy(self)
        view.index = self.index[np.asarray(list(index), dtype=np.int64)]
        return view

    def truncated(self, max_len: int) -> Conversations:
        """A view of every example cut to its first max_len tokens."""
        view = copy.copy(self)
        view.max_len = max_len
        return view

    def cut(self, max_len: int) -> tuple[Conversations, int]:
        """Each example cut to max_len tokens, less those with no answer token left; and how many left out
        (as zhlm's SFT has always skipped them: such an example carries no loss)."""
        keep = self.answer_start[self.index] < max_len
        return self.select(np.flatnonzero(keep)).truncated(max_len), int((~keep).sum())

    def first_by_id(self, n: int) -> Conversations:
        """The file's first n examples in order of their row id (written with order_by_id; a whole file)."""
        if self.by_id is None or len(self.index) != len(self.by_id):
            raise ValueError("first_by_id needs a whole file written with order_by_id")
        return self.select(self.by_id[:n])


def token_folder_files(folder) -> list[Path]:
    """The files of a token folder (not temporary ones): what a training run's fingerprint covers."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))


def check_tokenizer(token_dir: str | os.PathLike, tokenizer_file: str | os.PathLike) -> dict:
    """The token folder's meta.json, after checking that tokenizer_file made its files."""
    meta = read_json(Path(token_dir) / "meta.json")
    if meta["tokenizer_sha256"] != sha256_file(tokenizer_file):
        raise ValueError(f"{token_dir} was tokenised with another tokenizer than {tokenizer_file}")
    return meta
