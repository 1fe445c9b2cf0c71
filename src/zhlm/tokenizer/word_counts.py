"""Count jieba words over a text stream, in bounded memory.

The counts are what the BPE vocabulary is learned from: merges are learned
inside jieba words only, so frequent Chinese words become single tokens and no
token straddles two words.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import multiprocessing as mp
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from zhlm.io import as_paths, write_parquet

log = logging.getLogger(__name__)

_jieba = None


def init_jieba():
    """Import and initialise jieba once per process (loading its dictionary takes ~0.5 s)."""
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        _jieba = jieba
    return _jieba


# A word in Latin letters, accented ones included (pinyin, French, Vietnamese).
LATIN_WORD = re.compile(r"[A-Za-z\u00C0-\u024F\u1E00-\u1EFF]+")


def jieba_words(text: str) -> list[str]:
    """jieba's words (`jieba.lcut`, HMM on), with Latin-script words made whole again.

    jieba keeps only ASCII letters together, so pinyin comes out in pieces ("shàng" as "sh",
    "à", "ng") and BPE, which merges inside words only, could never learn a syllable. Those
    pieces are joined, and a Latin word takes the one space before it, as the tokenizer's
    split does when it encodes ("bù shàng" is "bù", " shàng": tokens bù, Ġshàng).
    """
    words: list[str] = []
    for word in init_jieba().lcut(text):
        if words and LATIN_WORD.fullmatch(word):
            last = words[-1]
            if LATIN_WORD.fullmatch(last.removeprefix(" ")) or last == " ":
                words[-1] = last + word
                continue
        words.append(word)
    return words


def _count_chunk(texts: Sequence[str]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for text in texts:
        if text:
            counts.update(jieba_words(text))
    return counts


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def prune(counts: collections.Counter, max_words: int) -> None:
    """Keep the `max_words` most frequent words in place; ties go to the smaller word."""
    if len(counts) <= max_words:
        return
    keep = heapq.nsmallest(max_words, counts.items(), key=lambda kv: (-kv[1], kv[0]))
    counts.clear()
    counts.update(dict(keep))


def count_words(
    texts: Iterable[str],
    *,
    processes: int = 1,
    max_words: int = 200_000,
    chunk_size: int = 1000,
) -> dict[str, int]:
    """Count jieba words (`jieba_words`) over `texts`, which may be a generator.

    Returns at most `max_words` words. Memory does not grow with the corpus: whenever
    the table exceeds 2 * max_words entries it is pruned to the max_words most frequent.
    A pruned word restarts from zero if it comes back, so counts of words near the
    cut-off are approximate (underestimates); frequent words are exact in practice.
    With processes > 1, chunks of `chunk_size` texts are segmented in a fork Pool and
    merged in input order, so the result does not depend on scheduling.
    """
    if max_words < 1 or chunk_size < 1 or processes < 1:
        raise ValueError("max_words, chunk_size and processes must be >= 1")
    total: collections.Counter = collections.Counter()
    merged_chunks = 0

    def merge(part: collections.Counter) -> None:
        nonlocal merged_chunks
        total.update(part)
        if len(total) > 2 * max_words:
            prune(total, max_words)
        merged_chunks += 1
        if merged_chunks % 100 == 0:
            log.info("counted %d texts: %d distinct words", merged_chunks * chunk_size, len(total))

    chunks = _chunks(texts, chunk_size)
    if processes == 1:
        for chunk in chunks:
            merge(_count_chunk(chunk))
    else:
        # fork, not spawn: spawn would re-run the calling script (e.g. a Snakemake
        # script) in every worker. A bounded window of apply_async calls instead of
        # Pool.imap, because imap's feeder thread reads the whole input ahead and so
        # would hold the corpus in memory when the workers are slower than the reader.
        with mp.get_context("fork").Pool(processes, initializer=init_jieba) as pool:
            pending: collections.deque = collections.deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_count_chunk, (chunk,)))
                if len(pending) >= 2 * processes:
                    merge(pending.popleft().get())
            while pending:
                merge(pending.popleft().get())
    prune(total, max_words)
    return dict(total)


def iter_parquet_texts(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    columns: Sequence[str] = ("text", "prompt", "response", "chosen", "rejected"),
    *,
    batch_size: int = 4096,
) -> Iterator[str]:
    """Yield the non-empty strings of those `columns` each parquet file has, one batch in memory at a time."""
    for path in as_paths(paths):
        pf = pq.ParquetFile(path)
        present = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=batch_size, columns=present):
            for name in present:
                for text in batch.column(name).to_pylist():
                    if text:
                        yield text


def save_word_counts(counts: Mapping[str, int], path: str | os.PathLike) -> None:
    """Write (word, count) to parquet, most frequent first, ties by word."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    table = pa.table({
        "word": pa.array([w for w, _ in items], pa.string()),
        "count": pa.array([c for _, c in items], pa.int64()),
    })
    write_parquet(table, path)


def load_word_counts(path: str | os.PathLike) -> dict[str, int]:
    table = pq.read_table(path, columns=["word", "count"])
    return dict(zip(table.column("word").to_pylist(), table.column("count").to_pylist()))
