"""Token ids of the pretraining text as a flat memmap: one `<|endoftext|>` after each document.

The split files come in source order, so each source's documents are one run of the token
file; meta.json records each source's [start, end) token spans (`sources`), which is what
lets a pretraining phase draw its windows from the sources by weight
(zhlm.train.batches.MixtureWindows) without a second copy of the tokens.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer
from tqdm import tqdm

from zhlm.io import as_paths, atomic_path, sha256_file
from zhlm.tokenizer.chat import EOT


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def binarize(parquet_paths, tokenizer_file: str | os.PathLike,
             out_bin: str | os.PathLike, *, column: str = "text", batch_size: int = 1024,
             progress: bool = True) -> dict:
    """Encode `column` of a parquet file (or of several, in order) into `out_bin`; return its meta entry.

    Batches go through the tokenizer's own parallel `encode_batch`; only one
    batch of ids is in memory at a time. Where the files have a `source` column, the entry's
    `sources` maps each source to its token spans, [[start, end], ...] (one span per source
    when its rows are consecutive, as split files are).
    """
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"{tokenizer_file} has no {EOT} token")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    files = [pq.ParquetFile(p) for p in as_paths(parquet_paths)]
    tokens = documents = characters = 0
    spans = Spans()
    with atomic_path(out_bin) as tmp, open(tmp, "wb") as out, \
            tqdm(total=sum(f.metadata.num_rows for f in files), unit="doc", desc=f"binarize {Path(out_bin).name}",
                 disable=not progress) as bar:
        for batch in (batch for f in files for batch in f.iter_batches(batch_size=batch_size,
                                                                        columns=columns_of(f, column))):
            names = batch.column("source").to_pylist() if "source" in batch.schema.names else [None] * len(batch)
            kept = [(text, source) for text, source in zip(batch.column(column).to_pylist(), names) if text]
            texts = [text for text, _ in kept]
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in encodings]
            for (_, source), doc in zip(kept, ids):
                spans.add(source, doc.size)
            if ids:
                chunk = np.concatenate(ids)
                chunk.tofile(out)
                tokens += chunk.size
            documents += len(texts)
            characters += sum(map(len, texts)) + len(texts)
            bar.update(batch.num_rows)
    # characters counts one per document for its <|endoftext|>, the unit of bits per character.
    entry = {"file": Path(out_bin).name, "tokens": tokens, "documents": documents, "characters": characters,
             "dtype": dtype.name, "vocab_size": vocab_size, "eot_id": eot,
             "tokenizer_sha256": sha256_file(tokenizer_file)}
    return entry | ({"sources": spans.by_source} if spans.by_source else {})


def columns_of(file: pq.ParquetFile, column: str) -> list[str]:
    """The text column, and the source column where the file has one."""
    return [column] + (["source"] if "source" in file.schema_arrow.names else [])


class Spans:
    """Each source's [start, end) token spans in the order documents are written; a document
    that follows one of the same source extends its span."""

    def __init__(self):
        self.by_source: dict[str, list[list[int]]] = {}
        self.end, self.last = 0, None

    def add(self, source: str | None, size: int):
        if source is not None:
            runs = self.by_source.setdefault(source, [])
            if source == self.last:
                runs[-1][1] += size
            else:
                runs.append([self.end, self.end + size])
        self.end += size
        self.last = source


def load_tokens(path: str | os.PathLike, dtype: str) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")
