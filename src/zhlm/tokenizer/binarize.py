"""Token ids of the pretraining text as a flat memmap: one `<|endoftext|>` after each document."""
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
    batch of ids is in memory at a time.
    """
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"{tokenizer_file} has no {EOT} token")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    sources = [pq.ParquetFile(p) for p in as_paths(parquet_paths)]
    batches = (batch for source in sources for batch in source.iter_batches(batch_size=batch_size, columns=[column]))
    tokens = documents = characters = 0
    with atomic_path(out_bin) as tmp, open(tmp, "wb") as out, \
            tqdm(total=sum(s.metadata.num_rows for s in sources), unit="doc", desc=f"binarize {Path(out_bin).name}",
                 disable=not progress) as bar:
        for batch in batches:
            texts = [t for t in batch.column(0).to_pylist() if t]
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            ids = [np.asarray(e.ids + [eot], dtype=dtype) for e in encodings]
            if ids:
                chunk = np.concatenate(ids)
                chunk.tofile(out)
                tokens += chunk.size
            documents += len(texts)
            characters += sum(map(len, texts)) + len(texts)
            bar.update(batch.num_rows)
    # characters counts one per document for its <|endoftext|>, the unit of bits per character.
    return {"file": Path(out_bin).name, "tokens": tokens, "documents": documents, "characters": characters,
            "dtype": dtype.name, "vocab_size": vocab_size, "eot_id": eot,
            "tokenizer_sha256": sha256_file(tokenizer_file)}


def load_tokens(path: str | os.PathLike, dtype: str) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")
