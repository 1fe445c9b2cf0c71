"""Exact and near-duplicate removal with MinHash LSH.

Rows are visited in table order and the first member of a cluster is kept, so
the result is deterministic and independent of `processes`.

1. Exact: rows whose normalised text (`normalise`: lowercase, no whitespace, no
   punctuation) hashes equal to an earlier row's are removed as "exact", with
   `duplicate_of` the first such row (which step 2 may remove in its turn).
2. Near: the MinHash signature of each remaining row's character n-gram set is
   looked up in a datasketch `MinHashLSH`; among the candidates whose estimated
   Jaccard similarity is ≥ threshold, the earliest kept row is the original and
   the row is removed as "near". Otherwise it is kept and inserted. A row that
   shares no LSH band with any other row can have no candidate and is never a
   candidate, so it is kept without going through the index (found in numpy).

Signatures are computed with numpy for whole chunks of texts (the speed of this
stage), exactly as datasketch's MinHash (scheme "affine32") computes them from
32-bit shingle hashes: the MurmurHash3 finalizer, then h → a·h + b mod 2³² for
each of the MinHash's own permutations (a, b), then the minimum per text. They
are handed to `MinHash(hashvalues=...)`; tests check the result equals
`MinHash.update_batch`.
"""
from __future__ import annotations

import functools
import hashlib
import multiprocessing

import numpy as np
import pyarrow as pa
from datasketch import MinHash, MinHashLSH

from zhlm.data.clean import char_remover
from zhlm.data.schema import KIND_FIELDS, text_of

_drop_space_and_punct = char_remover(("Zs", "Zl", "Zp", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"), extra=r"\s")

# Defaults measured on the demo corpus (benchmarks/bench_clean_dedup.py): character
# bigrams at Jaccard 0.7 find ~90% of copies with 5% of their characters substituted
# (~97% of those of 20+ characters), while 5-grams at 0.8 find almost none of them.
DEFAULTS = {"ngram": 2, "num_perm": 128, "threshold": 0.7}

_SCHEME = "affine32"
_POLY = np.uint64(0x9E3779B97F4A7C15)   # odd multiplier of the rolling n-gram hash
_BLOCK_SHINGLES = 16_384                 # shingles per numpy block: (num_perm, block) stays in cache
_CHUNK_TEXTS = 2_000                     # texts per task (and per pool job)
# MinHashLSH weights (false positive, false negative) for choosing its bands. Every
# candidate is verified with MinHash.jaccard >= threshold, so a false positive of the
# index costs one comparison, while a false negative is a duplicate kept: weigh recall.
# (With datasketch's (0.5, 0.5) a pair right at the threshold is a candidate < 50% of the time.)
LSH_WEIGHTS = (0.1, 0.9)


def normalise(text: str) -> str:
    """The dedup form of a text: lowercase, whitespace and punctuation dropped.

    A text made only of whitespace and punctuation keeps its own form, so that
    "？？" and "！！" are not duplicates of each other.
    """
    return _drop_space_and_punct(text.lower()) or text


# --- signatures ---------------------------------------------------------------


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, which datasketch applies to every input hash."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the character n-grams of each text, concatenated, and their count per text.

    A text shorter than `ngram` is one shingle (itself). The hash of the code
    points c1..cn is h = (h + c)·P over them, i.e. Σ c_k·P^(n+1−k) mod 2⁶⁴, of
    which the high 32 bits are kept: each character is multiplied by the odd P at
    least once, which carries it into the high bits (a plain polynomial would
    leave the last character in the low bits only).
    """
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    total = int(lens.sum())
    starts = np.cumsum(lens) - lens
    # Code points, padded so that every window start (incl. that of an empty last text) is in range.
    cps = np.zeros(total + ngram, dtype=np.uint64)
    cps[:total] = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    short = lens < ngram
    short_hash = np.zeros(len(texts), dtype=np.uint64)
    h = np.zeros(total + 1, dtype=np.uint64)
    for k in range(ngram):
        h = (h + cps[k:k + total + 1]) * _POLY
        done = short & (lens == k + 1)      # a short text is its own shingle: its hash so far
        short_hash[done] = h[starts[done]]
    counts = np.where(short, 1, lens - ngram + 1)
    offsets = np.cumsum(counts) - counts
    positions = np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))
    hashes = h[positions]
    hashes[offsets[short]] = short_hash[short]
    return (hashes >> np.uint64(32)).astype(np.uint32), counts


def signatures(texts: list[str], ngram: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash hash values (len(texts), num_perm) uint32 of the n-gram sets of `texts`,
    for the affine32 permutations (a, b) of a datasketch MinHash."""
    hashes, counts = shingle_hashes(texts, ngram)
    hashes = _fmix32(hashes)
    ends = np.cumsum(counts)
    out = np.empty((len(a), len(texts)), dtype=np.uint32)
    a, b = a[:, None], b[:, None]
    i = 0
    while i < len(texts):
        # Whole texts per block, about _BLOCK_SHINGLES shingles (at least one text).
        j = max(int(np.searchsorted(ends, ends[i] - counts[i] + _BLOCK_SHINGLES, side="right")), i + 1)
        lo, hi = int(ends[i] - counts[i]), int(ends[j - 1])
        # Permutations along axis 0, shingles along axis 1: the per-text minimum is
        # then a reduceat over contiguous memory, many times faster than along axis 0.
        phv = a * hashes[lo:hi]
        phv += b
        out[:, i:j] = np.minimum.reduceat(phv, (ends[i:j] - counts[i:j]) - lo, axis=1)
        i = j
    return np.ascontiguousarray(out.T)


def _permutations(num_perm: int, seed: int) -> np.ndarray:
    return MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _chunk_task(texts: list[str], ngram: int, num_perm: int, seed: int) -> tuple[list[bytes], np.ndarray]:
    """Exact-match digests and MinHash signatures of the normalised texts of one chunk."""
    texts = [normalise(t) for t in texts]
    a, b = _permutations(num_perm, seed)
    return [_digest(t) for t in texts], signatures(texts, ngram, a, b)


def digests_and_signatures(texts: list[str], ngram: int, num_perm: int, seed: int,
                           processes: int = 1) -> tuple[list[bytes], np.ndarray]:
    """Digests and signatures (len(texts), num_perm) of all texts, computed in chunks,
    in a process pool when processes > 1; the order (and so the result) is the same."""
    chunks = [texts[i:i + _CHUNK_TEXTS] for i in range(0, len(texts), _CHUNK_TEXTS)]
    task = functools.partial(_chunk_task, ngram=ngram, num_perm=num_perm, seed=seed)
    if processes > 1 and len(chunks) > 1:
        with multiprocessing.get_context().Pool(min(processes, len(chunks))) as pool:
            parts = pool.map(task, chunks)
    else:
        parts = [task(chunk) for chunk in chunks]
    digests = [d for part, _ in parts for d in part]
    sigs = np.concatenate([s for _, s in parts]) if parts else np.empty((0, num_perm), np.uint32)
    return digests, sigs


def _shares_a_band(sigs: np.ndarray, hashranges: list[tuple[int, int]]) -> np.ndarray:
    """Whether each row's LSH band values equal another row's in at least one band.

    A row that shares no band with any other row can neither be a candidate nor
    have one, so it skips the (per-row, Python-speed) LSH index and is kept. The
    band key is a hash of the band's values: a collision only lets a row into the
    index needlessly, it never keeps a row out.
    """
    shared = np.zeros(len(sigs), dtype=bool)
    for start, end in hashranges:
        key = np.zeros(len(sigs), dtype=np.uint64)
        for col in range(start, end):
            key = key * _POLY + sigs[:, col]
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        shared |= counts[inverse.reshape(-1)] > 1
    return shared


# --- the table ----------------------------------------------------------------


def dedup_table(table: pa.Table, kind: str, *, ngram: int = DEFAULTS["ngram"],
                num_perm: int = DEFAULTS["num_perm"], threshold: float = DEFAULTS["threshold"], seed: int = 1,
                processes: int = 1, lsh_weights: tuple[float, float] = LSH_WEIGHTS,
                ) -> tuple[pa.Table, pa.Table, dict]:
    """Remove exact and near duplicates of `text_of(row, kind)`; the first of each cluster stays.

    Returns (kept rows, removed rows + `reason` ("exact" | "near"), `duplicate_of`
    (id of the kept row it duplicates) and `similarity` (estimated Jaccard; 1.0
    for exact), stats).
    """
    n = table.num_rows
    columns = {f: table.column(f).to_pylist() for f in KIND_FIELDS[kind]}
    ids = table.column("id").to_pylist()
    texts = [text_of({f: columns[f][i] for f in columns}, kind) for i in range(n)]
    # Signatures of exact duplicates are computed too (and unused): that keeps the
    # whole per-text work in one parallel pass.
    digests, sigs = digests_and_signatures(texts, ngram, num_perm, seed, processes)

    removed: dict[int, tuple[str, str, float]] = {}   # row -> (reason, duplicate_of, similarity)
    first_of: dict[bytes, int] = {}
    for i, digest in enumerate(digests):
        j = first_of.setdefault(digest, i)
        if j != i:
            removed[i] = ("exact", ids[j], 1.0)
    distinct = np.array(sorted(first_of.values()), dtype=np.int64)

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=lsh_weights)
    shared = _shares_a_band(sigs[distinct], lsh.hashranges)
    permutations = _permutations(num_perm, seed)
    kept_minhash: dict[int, MinHash] = {}
    for i in distinct[shared].tolist():
        m = MinHash(seed=seed, hashvalues=sigs[i], permutations=permutations, scheme=_SCHEME)
        best, best_sim = None, 0.0
        for j in lsh.query(m):
            sim = m.jaccard(kept_minhash[j])
            if sim >= threshold and (best is None or j < best):
                best, best_sim = j, sim
        if best is None:
            lsh.insert(i, m, check_duplication=False)
            kept_minhash[i] = m
        else:
            removed[i] = ("near", ids[best], best_sim)

    gone = sorted(removed)
    keep = np.setdiff1d(np.arange(n), np.array(gone, dtype=np.int64), assume_unique=True)
    kept = table.take(pa.array(keep, type=pa.int64()))
    removed_table = table.take(pa.array(gone, type=pa.int64()))
    for name, typ, col in (("reason", pa.string(), 0), ("duplicate_of", pa.string(), 1),
                           ("similarity", pa.float64(), 2)):
        removed_table = removed_table.append_column(
            name, pa.array([removed[i][col] for i in gone], type=typ))
    n_exact = sum(1 for r in removed.values() if r[0] == "exact")
    stats = {
        "rows_in": n,
        "rows_kept": len(keep),
        "rows_removed": len(gone),
        "removed_exact": n_exact,
        "removed_near": len(gone) - n_exact,
        "params": {"ngram": ngram, "num_perm": num_perm, "threshold": threshold, "seed": seed,
                   "lsh_bands": lsh.b, "lsh_rows": lsh.r},
    }
    return kept, removed_table, stats
