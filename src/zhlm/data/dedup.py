"""Exact and near-duplicate removal with MinHash LSH, in stages over shards.

The stages have the shape of datatrove's and NeMo Curator's MinHash dedup
(signatures → buckets → clusters → filter); each is a set of jobs whose memory
is bounded by a shard, by one group of bands, or by the candidate rows:

1. `signature_table` (a job per clean shard): per row its `ptr` (source number,
   shard, row: where it is), id, source, the digest of its normalised text, the
   normalised length, the normalised text itself when short, the MinHash
   signature and the LSH band keys.
2. `exact_duplicates` (a job per kind): the rows sharing a digest.
3. `candidate_pairs` (`band_jobs` jobs per kind, each a group of bands): the rows,
   exact duplicates left out, that share a band key.
4. `near_duplicates` (a job per kind): verifies the candidate pairs from the
   signatures of the candidate rows only, and decides which rows go.
5. `filter_shard` (a job per shard): the kept rows, and the removed rows with
   `reason`, `duplicate_of` and `similarity`; `summarise` adds up the shards.

The rule. Rows are ranked in the order (id, source, ptr) over all sources of a kind
— ptr only orders rows with the same id and source, as they come in their source
(clean shards are contiguous slices), so the result does not depend on how many
shards a source has (nor on the order of the sources):

- exact: a row whose normalised text (`normalise`: lowercase, no whitespace, no
  punctuation) has the digest of an earlier-ranked row's is removed as "exact", with
  `duplicate_of` the first row of that digest (which may go as "near" in turn).
- candidates: among the first rows of their digests, the rows that share an LSH band
  key form a bucket; each of the bucket's first `ANCHORS` rows (in ptr order) is paired
  with each other row of it, as NeMo Curator's anchors do. A bucket of m rows gives at
  most ANCHORS·(m−1) pairs, not m(m−1)/2: the pairs grow with the corpus, not with its
  square (short texts share band keys by chance often enough for that to matter).
- near: the candidate pairs that are *similar* join their rows into clusters
  (connected components); the first-ranked row of a cluster stays and every other
  row goes as "near", `duplicate_of` that first row, `similarity` their similarity
  score (a row can join through a third row, so it may be below the threshold).
- similar: estimated Jaccard similarity of the character n-gram sets ≥
  `threshold`; or, when both normalised texts are shorter than `short_chars`,
  estimated Jaccard ≥ `short_threshold` and character similarity
  (`char_similarity`) ≥ `short_similarity`. The score is the Jaccard estimate, or
  the character similarity where that decided (1.0 for exact).
- band keys: the bands of datasketch's `MinHashLSH` for `threshold` with weights
  `LSH_WEIGHTS`; rows shorter than `short_chars` also get bands for
  `short_threshold`: one substituted character changes n of a text's n-grams,
  so a short copy is less similar to its original than a long one is.

`dedup_table` is the single-process reference: the same rule over the buckets of
datasketch's `MinHashLSH` indexes; tests check that the stages give exactly its result. The
stages' band keys are 64-bit hashes of the band's values, so two rows share a key
where datasketch's bands are equal, or (with probability 2⁻⁶⁴ per pair) collide.

Memory: a signature or filter job holds its shard; the exact job the rows of repeated
digests; a band job one band's (ptr, key) column at a time and its pairs; the cluster job
the candidate pairs and the candidate rows' signatures, never all signatures.

Signatures are computed with numpy for whole chunks of texts, exactly as
datasketch's MinHash (scheme "affine32") computes them from 32-bit shingle
hashes: the MurmurHash3 finalizer, then h → a·h + b mod 2³² for each of the
MinHash's own permutations (a, b), then the minimum per text.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib

import numpy as np
import polars as pl
import pyarrow as pa
from datasketch import MinHash, MinHashLSH

from zhlm.data.clean import char_remover
from zhlm.data.schema import KIND_FIELDS, text_of

_drop_space_and_punct = char_remover(("Zs", "Zl", "Zp", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"), extra=r"\s")

_SCHEME = "affine32"
_POLY = np.uint64(0x9E3779B97F4A7C15)   # odd multiplier of the rolling n-gram hash
_BLOCK_SHINGLES = 16_384                 # shingles per numpy block: (num_perm, block) stays in cache
_CHUNK_TEXTS = 2_000                     # texts per signature chunk
# MinHashLSH weights (false positive, false negative) for choosing its bands. Every
# candidate is verified, so a false positive of the index costs one comparison, while a
# false negative is a duplicate kept: weigh recall.
LSH_WEIGHTS = (0.1, 0.9)
_SHARD_BITS, _ROW_BITS = 16, 32          # ptr = source_no << 48 | shard << 32 | row
ANCHORS = 2                              # rows of a bucket that each other row of it is compared with


@dataclasses.dataclass(frozen=True)
class Params:
    """What decides dedup's result (defaults measured by benchmarks/bench_dedup.py; the
    workflow's come from the config schema)."""
    ngram: int = 2                  # character n-gram size of the shingles
    num_perm: int = 128             # MinHash permutations
    threshold: float = 0.65         # estimated Jaccard similarity of a near duplicate
    short_chars: int = 40           # normalised texts shorter than this are "short"
    short_threshold: float = 0.4    # Jaccard similarity of short texts that are compared by characters
    short_similarity: float = 0.85  # character similarity of a near duplicate between short texts
    seed: int = 1

    @property
    def bands(self) -> list[tuple[int, int]]:
        return _lsh_ranges(self.threshold, self.num_perm)

    @property
    def short_bands(self) -> list[tuple[int, int]]:
        return _lsh_ranges(self.short_threshold, self.num_perm)

    def band_names(self) -> list[str]:
        return [f"lsh_{k}" for k in range(len(self.bands))] + [f"lsh_short_{k}" for k in range(len(self.short_bands))]


DEFAULTS = dataclasses.asdict(Params())


@functools.lru_cache
def _lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def _lsh_ranges(threshold: float, num_perm: int) -> list[tuple[int, int]]:
    b, r = _lsh_params(threshold, num_perm)
    return [(k * r, (k + 1) * r) for k in range(b)]


def ptr_of(source_no: int, shard: int, row: int | np.ndarray = 0):
    """Where a row is, as one int64: its source's number among the kind's sources, its shard, its row."""
    assert 0 <= source_no < 1 << (63 - _SHARD_BITS - _ROW_BITS) and 0 <= shard < 1 << _SHARD_BITS
    return (source_no << (_SHARD_BITS + _ROW_BITS)) | (shard << _ROW_BITS) | row

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


def digests_and_signatures(texts: list[str], params: Params) -> tuple[list[bytes], np.ndarray]:
    """Digests and signatures (len(texts), num_perm) of texts already normalised, in chunks."""
    a, b = _permutations(params.num_perm, params.seed)
    digests = [_digest(t) for t in texts]
    parts = [signatures(texts[i:i + _CHUNK_TEXTS], params.ngram, a, b) for i in range(0, len(texts), _CHUNK_TEXTS)]
    sigs = np.concatenate(parts) if parts else np.empty((0, params.num_perm), np.uint32)
    return digests, sigs


def band_keys(sigs: np.ndarray, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
    """Per band, a 64-bit hash of each row's values in that band."""
    keys = []
    for start, end in ranges:
        key = np.zeros(len(sigs), dtype=np.uint64)
        for col in range(start, end):
            key = key * _POLY + sigs[:, col]
        keys.append(key)
    return keys


def char_similarity(a: str, b: str) -> float:
    """difflib's ratio 2·M/(len a + len b) of matching characters (1 − k/n for k of n substituted),
    of the two texts in sorted order, so that it is symmetric."""
    a, b = sorted((a, b))
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _texts(table: pa.Table, kind: str) -> list[str]:
    columns = {f: table.column(f).to_pylist() for f in KIND_FIELDS[kind]}
    return [normalise(text_of({f: columns[f][i] for f in columns}, kind)) for i in range(table.num_rows)]


# --- stage 1: signatures (per shard) ---------------------------------------------


def signature_table(table: pa.Table, kind: str, params: Params = Params(), *, source_no: int = 0,
                    shard: int = 0) -> pa.Table:
    """Per row of one clean shard: ptr, id, source, digest, length and (short rows only)
    short_text of the normalised text, signature (num_perm uint32, little-endian bytes),
    and a column per band of uint64 keys (`params.band_names()`: lsh_{k}, and lsh_short_{k}, null for long rows)."""
    texts = _texts(table, kind)
    digests, sigs = digests_and_signatures(texts, params)
    lengths = np.fromiter(map(len, texts), dtype=np.int32, count=len(texts))
    short = lengths < params.short_chars
    columns = {
        "ptr": pa.array(ptr_of(source_no, shard, np.arange(table.num_rows, dtype=np.int64)), pa.int64()),
        "id": table.column("id").combine_chunks(),
        "source": table.column("source").combine_chunks(),
        "digest": pa.array(digests, pa.binary(16)),
        "length": pa.array(lengths, pa.int32()),
        "short_text": pa.array([t if s else None for t, s in zip(texts, short.tolist())], pa.string()),
        "signature": pa.array([row.tobytes() for row in sigs.astype("<u4")], pa.binary(4 * params.num_perm)),
    }
    for k, key in enumerate(band_keys(sigs, params.bands)):
        columns[f"lsh_{k}"] = pa.array(key, pa.uint64())
    for k, key in enumerate(band_keys(sigs, params.short_bands)):
        columns[f"lsh_short_{k}"] = pa.array(key, pa.uint64(), mask=~short)
    return pa.table(columns)


def band_groups(names: list[str], band_jobs: int) -> list[list[str]]:
    """The bands of each of `band_jobs` band jobs (round robin; a job may get none)."""
    return [names[j::band_jobs] for j in range(band_jobs)]


def band_columns(schema_names: list[str]) -> list[str]:
    """The band columns of a signature table, in `Params.band_names` order."""
    def order(name):
        prefix, k = name.rsplit("_", 1)
        return prefix == "lsh_short", int(k)
    return sorted((n for n in schema_names if n.startswith("lsh_")), key=order)


# --- stage 2: exact duplicates (per kind) -------------------------------------------

_EXACT_SCHEMA = {"ptr": pl.Int64, "duplicate_ptr": pl.Int64, "duplicate_of": pl.String}


def exact_duplicates(sigs: pl.LazyFrame) -> pl.DataFrame:
    """ptr, duplicate_ptr and duplicate_of (id) of every row whose digest an earlier row has.
    Only the rows of repeated digests are held in memory."""
    rows = sigs.select("ptr", "id", "source", "digest")
    repeated = rows.group_by("digest").agg(pl.len().alias("n")).filter(pl.col("n") > 1).select("digest")
    rows = rows.join(repeated, on="digest", how="semi").collect(engine="streaming")
    if rows.is_empty():
        return pl.DataFrame(schema=_EXACT_SCHEMA)
    rows = rows.sort(["digest", "id", "source", "ptr"])
    first = rows.group_by("digest", maintain_order=True).first().select(
        "digest", duplicate_ptr="ptr", duplicate_of="id")
    return (rows.join(first, on="digest").filter(pl.col("ptr") != pl.col("duplicate_ptr"))
            .select(*_EXACT_SCHEMA).sort("ptr"))


# --- stage 3: candidate pairs (per group of bands) -----------------------------------


def candidate_pairs(sigs: pl.LazyFrame, exact: pl.LazyFrame, bands: list[str]) -> pl.DataFrame:
    """Pairs (a < b, ptrs) of rows, exact duplicates left out, that share a key in one of `bands`:
    each of a key's first ANCHORS rows with each other row of it. One band at a time: only its
    key and ptr columns are read, and only the rows of repeated keys held."""
    parts = [pl.DataFrame(schema={"a": pl.Int64, "b": pl.Int64})]
    for band in bands:
        rows = (sigs.select("ptr", key=pl.col(band)).drop_nulls("key")
                .join(exact.select("ptr"), on="ptr", how="anti"))
        repeated = rows.group_by("key").agg(pl.len().alias("n")).filter(pl.col("n") > 1).select("key")
        buckets = (rows.join(repeated, on="key", how="semi").group_by("key").agg(pl.col("ptr").sort())
                   .collect(engine="streaming"))
        for k in range(ANCHORS):   # the k-th row of each bucket with every later row of it
            parts.append(buckets.filter(pl.col("ptr").list.len() > k + 1)
                         .select(a=pl.col("ptr").list.get(k), b=pl.col("ptr").list.slice(k + 1)).explode("b"))
    return pl.concat(parts).unique().sort("a", "b")


# --- stage 4: clusters (per kind) --------------------------------------------------

DUPLICATES_SCHEMA = {"ptr": pl.Int64, "reason": pl.String, "duplicate_ptr": pl.Int64, "duplicate_of": pl.String,
                     "similarity": pl.Float64}


def pair_scores(sigs: np.ndarray, lengths: np.ndarray, texts: list, lo: np.ndarray, hi: np.ndarray,
                params: Params) -> tuple[np.ndarray, np.ndarray]:
    """The estimated Jaccard similarity of each pair (lo, hi) of rows, and the score that makes
    it similar (`similar` in the module docstring), NaN where the pair is not similar."""
    jaccard = np.empty(len(lo))
    step = max(1, (1 << 22) // max(params.num_perm, 1))
    for i in range(0, len(lo), step):
        jaccard[i:i + step] = (sigs[lo[i:i + step]] == sigs[hi[i:i + step]]).sum(axis=1) / params.num_perm
    score = np.where(jaccard >= params.threshold, jaccard, np.nan)
    short = ((lengths[lo] < params.short_chars) & (lengths[hi] < params.short_chars) & np.isnan(score)
             & (jaccard >= params.short_threshold))
    for i in np.flatnonzero(short).tolist():
        sim = char_similarity(texts[lo[i]], texts[hi[i]])
        if sim >= params.short_similarity:
            score[i] = sim
    return jaccard, score


def first_of_cluster(n: int, lo, hi) -> np.ndarray:
    """For each of n ranks, the smallest rank connected to it by the pairs (lo, hi) (union-find)."""
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(lo, hi):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(x) for x in range(n)], dtype=np.int64)


def near_duplicates(sigs: pl.LazyFrame, exact: pl.DataFrame, pairs: pl.LazyFrame,
                    params: Params) -> tuple[pl.DataFrame, dict]:
    """Every removed row of the kind (exact and near), with its reason, original and similarity,
    sorted by ptr; and the counts of candidate pairs and rows. Only the candidate rows'
    signatures are read."""
    pairs = pairs.unique().collect(engine="streaming")
    candidates = pl.concat([pairs["a"], pairs["b"]]).unique().to_frame("ptr")
    rows = (sigs.select("ptr", "id", "source", "length", "short_text", "signature")
            .join(candidates.lazy(), on="ptr", how="semi").collect(engine="streaming")
            .sort(["id", "source", "ptr"]))
    ptrs = rows["ptr"].to_numpy()
    by_ptr = np.argsort(ptrs)
    rank_a = by_ptr[np.searchsorted(ptrs, pairs["a"].to_numpy(), sorter=by_ptr)]
    rank_b = by_ptr[np.searchsorted(ptrs, pairs["b"].to_numpy(), sorter=by_ptr)]
    signatures_ = (np.frombuffer(b"".join(rows["signature"].to_list()), dtype="<u4").reshape(-1, params.num_perm)
                   if len(rows) else np.empty((0, params.num_perm), np.uint32))
    lengths, texts = rows["length"].to_numpy(), rows["short_text"].to_list()
    _, score = pair_scores(signatures_, lengths, texts, rank_a, rank_b, params)
    similar = ~np.isnan(score)
    first = first_of_cluster(len(rows), rank_a[similar].tolist(), rank_b[similar].tolist())
    gone = np.flatnonzero(first != np.arange(len(rows)))
    jaccard, score = pair_scores(signatures_, lengths, texts, first[gone], gone, params)
    ids = rows["id"].to_list()
    near = pl.DataFrame({
        "ptr": ptrs[gone], "reason": ["near"] * len(gone), "duplicate_ptr": ptrs[first[gone]],
        "duplicate_of": [ids[r] for r in first[gone].tolist()],
        "similarity": np.where(np.isnan(score), jaccard, score)}, schema=DUPLICATES_SCHEMA)
    exact = exact.select("ptr", reason=pl.lit("exact"), duplicate_ptr="duplicate_ptr",
                         duplicate_of="duplicate_of", similarity=pl.lit(1.0)).cast(DUPLICATES_SCHEMA)
    stats = {"candidate_pairs": len(pairs), "candidate_rows": len(rows), "similar_pairs": int(similar.sum()),
             "removed_exact": len(exact), "removed_near": len(near)}
    return pl.concat([exact, near]).sort("ptr"), stats


# --- stage 5: filter (per shard) ----------------------------------------------------


def filter_shard(table: pa.Table, duplicates: pl.LazyFrame | pl.DataFrame, *, source_no: int = 0,
                 shard: int = 0) -> tuple[pa.Table, pa.Table, dict]:
    """The kept rows of one clean shard, its removed rows with `reason` ("exact" | "near"),
    `duplicate_of` (the id of the row it duplicates) and `similarity`, and its counts."""
    first = ptr_of(source_no, shard)
    mine = (duplicates.lazy().filter(pl.col("ptr").is_between(first, first + table.num_rows - 1))
            .collect().sort("ptr"))
    gone = mine["ptr"].to_numpy() - first
    keep = np.setdiff1d(np.arange(table.num_rows), gone, assume_unique=True)
    kept = table.take(pa.array(keep, pa.int64()))
    removed = table.take(pa.array(gone, pa.int64()))
    for name, typ in (("reason", pa.string()), ("duplicate_of", pa.string()), ("similarity", pa.float64())):
        removed = removed.append_column(name, mine[name].to_arrow().cast(typ))
    n_exact = int((mine["reason"] == "exact").sum())
    stats = {"rows_in": table.num_rows, "rows_kept": kept.num_rows, "rows_removed": removed.num_rows,
             "removed_exact": n_exact, "removed_near": removed.num_rows - n_exact}
    return kept, removed, stats


def summarise(shards: dict[str, dict], clusters: dict, params: Params) -> dict:
    """A kind's counts: the shards' added up, each shard's, and the cluster job's."""
    total = {key: sum(s[key] for s in shards.values())
             for key in ("rows_in", "rows_kept", "rows_removed", "removed_exact", "removed_near")}
    assert total["rows_in"] == total["rows_kept"] + total["rows_removed"], total
    assert (total["removed_exact"], total["removed_near"]) == (clusters["removed_exact"], clusters["removed_near"])
    return {**total, "shards": shards, "clusters": clusters, "params": params_stats(params)}


def params_stats(params: Params) -> dict:
    return {**dataclasses.asdict(params), "lsh_weights": list(LSH_WEIGHTS),
            "lsh": list(_lsh_params(params.threshold, params.num_perm)),
            "short_lsh": list(_lsh_params(params.short_threshold, params.num_perm))}


def dedup_shards(shards: dict[str, list[pa.Table]], kind: str, params: Params = Params(),
                 band_jobs: int = 4) -> tuple[dict[str, list[pa.Table]], dict[str, list[pa.Table]], dict]:
    """All stages in this process over the clean shards of each source of a kind (as the
    workflow runs them as jobs): kept and removed tables per source and shard, and the summary."""
    sigs = pl.concat([pl.from_arrow(signature_table(t, kind, params, source_no=s, shard=k)).lazy()
                      for s, tables in enumerate(shards.values()) for k, t in enumerate(tables)])
    exact = exact_duplicates(sigs)
    names = params.band_names()
    pairs = pl.concat([candidate_pairs(sigs, exact.lazy(), group).lazy()
                       for group in band_groups(names, band_jobs)])
    duplicates, clusters = near_duplicates(sigs, exact, pairs, params)
    kept, removed, stats = {}, {}, {}
    for s, (source, tables) in enumerate(shards.items()):
        kept[source], removed[source] = [], []
        for k, t in enumerate(tables):
            kt, rt, st = filter_shard(t, duplicates, source_no=s, shard=k)
            kept[source].append(kt)
            removed[source].append(rt)
            stats[f"{source}/{k}"] = st
    return kept, removed, summarise(stats, clusters, params)


# --- the single-process reference --------------------------------------------------


def dedup_table(table: pa.Table, kind: str, params: Params = Params()) -> tuple[pa.Table, pa.Table, dict]:
    """The rule of the module docstring in one process, over the buckets of datasketch
    `MinHashLSH` indexes (a main one for every distinct row and a short one for the short rows).

    Returns (kept rows, removed rows + `reason`, `duplicate_of`, `similarity`, stats), both in
    table order.
    """
    n = table.num_rows
    texts = _texts(table, kind)
    ids, sources = table.column("id").to_pylist(), table.column("source").to_pylist()
    digests, sigs = digests_and_signatures(texts, params)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    is_short = lengths < params.short_chars
    order = sorted(range(n), key=lambda i: (ids[i], sources[i], i))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)

    removed: dict[int, tuple[str, str, float]] = {}   # row -> (reason, duplicate_of, similarity)
    first_of: dict[bytes, int] = {}
    for i in order:
        j = first_of.setdefault(digests[i], i)
        if j != i:
            removed[i] = ("exact", ids[j], 1.0)
    distinct = [i for i in order if i not in removed]

    # Buckets: the rows of each key of each band of two MinHashLSH indexes (every distinct
    # row, and the short ones), in table order, which is ptr order; pairs from their anchors.
    main = MinHashLSH(num_perm=params.num_perm, params=_lsh_params(params.threshold, params.num_perm))
    short = MinHashLSH(num_perm=params.num_perm, params=_lsh_params(params.short_threshold, params.num_perm))
    permutations = _permutations(params.num_perm, params.seed)
    minhash = {i: MinHash(seed=params.seed, hashvalues=sigs[i], permutations=permutations, scheme=_SCHEME)
               for i in distinct}
    for i in distinct:
        main.insert(i, minhash[i], check_duplication=False)
        if is_short[i]:
            short.insert(i, minhash[i], check_duplication=False)
    pairs = set()
    for table_ in [*main.hashtables, *short.hashtables]:
        for key in table_.keys():
            bucket = sorted(table_.get(key))
            pairs |= {(a, b) for k, a in enumerate(bucket[:ANCHORS]) for b in bucket[k + 1:]}

    def similarity(i, j) -> tuple[float, bool]:
        jaccard = minhash[i].jaccard(minhash[j])
        if jaccard >= params.threshold:
            return jaccard, True
        if is_short[i] and is_short[j] and jaccard >= params.short_threshold:
            chars = char_similarity(texts[i], texts[j])
            if chars >= params.short_similarity:
                return chars, True
        return jaccard, False

    # Clusters: union-find over the similar pairs, each led by its first row in rank order.
    leader = {i: i for i in distinct}

    def find(i):
        while leader[i] != i:
            i = leader[i]
        return i

    for a, b in sorted(pairs):
        if similarity(a, b)[1]:
            ra, rb = find(a), find(b)
            if ra != rb:
                leader[ra], leader[rb] = (rb, rb) if rank[rb] < rank[ra] else (ra, ra)
    for i in distinct:
        if find(i) != i:
            removed[i] = ("near", ids[find(i)], similarity(find(i), i)[0])

    gone = sorted(removed)
    keep = np.setdiff1d(np.arange(n), np.array(gone, dtype=np.int64), assume_unique=True)
    kept = table.take(pa.array(keep, type=pa.int64()))
    removed_table = table.take(pa.array(gone, type=pa.int64()))
    for name, typ, col in (("reason", pa.string(), 0), ("duplicate_of", pa.string(), 1),
                           ("similarity", pa.float64(), 2)):
        removed_table = removed_table.append_column(name, pa.array([removed[i][col] for i in gone], type=typ))
    n_exact = sum(1 for r in removed.values() if r[0] == "exact")
    stats = {"rows_in": n, "rows_kept": len(keep), "rows_removed": len(gone), "removed_exact": n_exact,
             "removed_near": len(gone) - n_exact, "params": params_stats(params)}
    return kept, removed_table, stats
