"""Atomic file writes and the small I/O helpers every stage shares.

A killed job must never leave a complete-looking artifact, so every final file
is written under a temporary name in the same folder and renamed into place.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# The Hugging Face tokenizer files a model folder carries, and every file of a stage's model
# folder (save_pretrained writes them, the training loop train_log.csv). Here, not in
# zhlm.model, so that the workflow can name them without importing torch.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES, "train_log.csv")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


@contextlib.contextmanager
def parquet_writer(path: str | os.PathLike, schema: pa.Schema):
    """Write a parquet file table by table (each `write_table` adds row groups), so memory
    holds one batch, never the file; zstd, and renamed into place only on success."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        yield writer


def read_parquet(path: str | os.PathLike) -> pa.Table:
    return pq.read_table(path)


def write_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def setup_logging(log_path: str | os.PathLike | None = None) -> logging.Logger:
    """Log to stderr and, when given, to the rule's log file; an exception that ends the script
    is logged too, with its traceback. Snakemake points the user of a failed job at its log, and
    shows a script's stderr only on the console (the training rules tee their stderr into the log)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    sys.excepthook = _log_uncaught
    return logging.getLogger("zhlm")


def _log_uncaught(kind, error, traceback) -> None:
    """sys.excepthook: the error and its traceback through the log's handlers (stderr among them),
    in place of Python's print to stderr. Ctrl-C keeps Python's short message."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    logging.getLogger("zhlm").critical("failed: %s: %s", kind.__name__, error, exc_info=(kind, error, traceback))


def as_paths(paths) -> list:
    """One path or several, as a list: stages read a split as the list of its shard files."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def read_parquets(paths) -> pa.Table:
    """Read one parquet file, or several of one schema as one table, in the given order."""
    return pa.concat_tables([pq.read_table(p) for p in as_paths(paths)], promote_options="default")


def concat_parquet(paths, out: str | os.PathLike) -> None:
    write_parquet(read_parquets(paths), out)
