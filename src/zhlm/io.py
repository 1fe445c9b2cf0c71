"""Atomic file writes and the small I/O helpers every stage shares.

A killed job must never leave a complete-looking artifact, so every final file
is written under a temporary name in the same folder and renamed into place; a
full disk is reported as such, naming the file, whatever library wrote it.
Checkpoints are "checked files": a header with the sha256 of their content.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# The Hugging Face tokenizer files a model folder carries, and every file of a stage's model
# folder (save_pretrained writes them, the training loop train_log.csv). Here, not in
# zhlm.model, so that the workflow can name them without importing torch.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES, "train_log.csv")
# What a stage trained with LoRA writes instead (zhlm.train.lora): peft's adapter files and the log.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_log.csv")


# A temporary file is named `.NAME.tmpPID` beside NAME: the writer's pid tells a stale one (its
# process is gone) from one being written.
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")
# What safetensors' save_file (tempfile's names) left before model files were written here.
_FOREIGN_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
# When a library hides the error's cause, the disk counts as full if less than this is free.
_NEARLY_FULL = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None):
    """Yield a temporary path next to `path`; rename it onto `path` on success.

    The file is flushed to disk before the rename (a full disk on a network filesystem
    may only show then) and gets the usual umask permissions, whatever the writer gave
    it. On failure the temporary file is removed and `path` keeps its previous content;
    a full disk is reported as ENOSPC naming the file, the bytes it needed (`size`, when
    the caller knows it) and the bytes free, whatever error the writing library raised.
    Stale temporary files of `path`, left by killed writers, are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, name=path.name)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():
            fsync(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        full = disk_full_error(exc, path, size, written) if isinstance(exc, Exception) else None
        if full is not None:
            raise full from exc
        raise


def write_bytes(path: str | os.PathLike, *chunks) -> None:
    """Write `chunks` (bytes-like) to `path` atomically, with plain writes: a full disk is a plain ENOSPC."""
    with atomic_path(path, size=sum(memoryview(c).nbytes for c in chunks)) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's renames (a checkpoint's rotation), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def disk_full_error(exc: Exception, path: Path, size: int | None, written: int) -> OSError | None:
    """An ENOSPC OSError that names `path`, its size and the free space, if `exc` came from a full disk.

    Libraries hide the cause: torch.save raises "basic_ios::clear: iostream error", safetensors
    a SafetensorError. So the disk counts as full when the error says so, or, for an error
    without an errno, when what is free (the temporary file removed) cannot hold the file.
    """
    try:
        free = shutil.disk_usage(path.parent).free
        inodes = os.statvfs(path.parent)
    except OSError:
        return None
    says_full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
                 or "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc))
    # An OSError with another errno names its own cause (permissions, an I/O error, ...).
    other_cause = isinstance(exc, OSError) and exc.errno is not None
    if not says_full and (other_cause or free >= (_NEARLY_FULL if size is None else size)):
        return None
    need = f"needs ~{size:,} bytes" if size is not None else f"needs more than the {written:,} bytes written"
    no_inodes = " and no free inodes" if inodes.f_files and not inodes.f_favail else ""
    return OSError(errno.ENOSPC, f"No space left on device writing {path}: {need}, {free:,} free{no_inodes}")


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary files in `folder` (of the file `name` only, if given) whose writer is gone.

    A killed job leaves `.NAME.tmpPID` behind; a rerun that succeeds would otherwise keep it
    forever. With no `name`, also removes safetensors' own `.tmpXXXXXX` files: call it that way
    only on a folder this job alone writes (a stage's output folder, at the stage's start).
    Returns the files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        ours = _TEMP.match(entry.name)
        stale = (ours is not None and name in (None, ours["name"]) and not _alive(int(ours["pid"]))
                 or name is None and _FOREIGN_TEMP.match(entry.name) is not None)
        if stale and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


# A checked file: MAGIC, the sha256 of the payload, the payload's length (8 bytes, little-endian), the payload.
CHECKED_MAGIC = b"ZHLMSUM1"
_HEADER = len(CHECKED_MAGIC) + 32 + 8


class CorruptFile(ValueError):
    """A checked file whose length or checksum does not match its header."""


def write_checked(path: str | os.PathLike, payload, before_rename: Callable[[], None] | None = None) -> None:
    """Write `payload` (bytes-like) with a header holding its sha256 and length, atomically.

    The written file is read back and verified before it replaces `path`; `before_rename`
    runs then (a checkpoint keeps its previous file under another name there).
    """
    payload = memoryview(payload)
    header = CHECKED_MAGIC + hashlib.sha256(payload).digest() + payload.nbytes.to_bytes(8, "little")
    with atomic_path(path, size=_HEADER + payload.nbytes) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        verify_checked(tmp)
        if before_rename is not None:
            before_rename()


def _read_header(f, path) -> tuple[bytes, int]:
    header = f.read(_HEADER)
    if len(header) < _HEADER or not header.startswith(CHECKED_MAGIC):
        raise CorruptFile(f"{path}: not a checked file (no {CHECKED_MAGIC.decode()} header: damaged, "
                          "or written without one)")
    return header[len(CHECKED_MAGIC):-8], int.from_bytes(header[-8:], "little")


def _check(path, digest, length, h, got: int) -> None:
    if got < length:
        raise CorruptFile(f"{path}: truncated: {got:,} bytes of {length:,}")
    if got > length:
        raise CorruptFile(f"{path}: {got - length:,} bytes more than the {length:,} written")
    if h.digest() != digest:
        raise CorruptFile(f"{path}: checksum mismatch: its content changed after it was written")


def verify_checked(path: str | os.PathLike, chunk: int = 1 << 22) -> int:
    """Raise CorruptFile unless `path` is a complete checked file; returns the payload's length.
    Reads in chunks: memory stays small whatever the file's size."""
    with open(path, "rb") as f:
        digest, length = _read_header(f, path)
        h, got = hashlib.sha256(), 0
        while block := f.read(chunk):
            h.update(block)
            got += len(block)
    _check(path, digest, length, h, got)
    return length


def read_checked(path: str | os.PathLike) -> bytes:
    """The payload of a checked file; CorruptFile if it is truncated, altered or not one."""
    with open(path, "rb") as f:
        digest, length = _read_header(f, path)
        payload = f.read()
    _check(path, digest, length, hashlib.sha256(payload), len(payload))
    return payload


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
