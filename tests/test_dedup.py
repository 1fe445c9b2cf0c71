import random
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import yaml
from datasketch import MinHash

from zhlm.data import dedup, demo
from zhlm.data.clean import clean_text
from zhlm.data.dedup import Params, dedup_shards, dedup_table, normalise, shingle_hashes, signatures
from zhlm.data.schema import rows_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def news():
    """Distinct real paragraphs of 100–400 characters."""
    texts, seen = [], set()
    for row in demo.build("news")[3000:]:
        t = row["text"]
        if 100 <= len(t) <= 400 and t[:20] not in seen:
            seen.add(t[:20])
            texts.append(t)
        if len(texts) == 300:
            break
    return texts


def substitute(text: str, rate: float, rng: random.Random) -> str:
    """`text` with max(1, round(rate·len)) characters replaced by other CJK characters."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), max(1, round(rate * len(chars)))):
        new = chr(rng.randrange(0x4E00, 0x9FA6))
        while new == chars[i]:
            new = chr(rng.randrange(0x4E00, 0x9FA6))
        chars[i] = new
    return "".join(chars)


def table(texts, prefix="d", width=0):
    """Rows with ids prefix:i (zero-padded to `width`, so that id order is table order past 9)."""
    return rows_table([{"id": f"{prefix}:{i:0{width}d}", "source": "t", "text": t} for i, t in enumerate(texts)],
                      "pretrain")


def removed_by_id(removed):
    return {r["id"]: r for r in removed.to_pylist()}


def test_signatures_are_datasketch_minhashes():
    texts = ["", "a", "ab", "你好", "你好世界你好世界", "一二三四五六七八九十" * 20, "😀🙂x"]
    for ngram in (1, 2, 5):
        template = MinHash(num_perm=64, seed=3)
        sigs = signatures(texts, ngram, *template.permutations)
        hashes, counts = shingle_hashes(texts, ngram)
        assert counts.tolist() == [max(len(t) - ngram + 1, 1) for t in texts]
        offsets = np.cumsum(counts) - counts
        for t, (start, count) in enumerate(zip(offsets, counts)):
            m = MinHash(num_perm=64, seed=3, hashfunc=int)
            m.update_batch(hashes[start:start + count].tolist())
            assert (m.hashvalues == sigs[t]).all()


def test_every_character_of_an_ngram_matters():
    hashes, _ = shingle_hashes(["谢谢", "谢文", "ab", "ba", "abcde", "abcdf", "bbcde"], 5)
    assert len(set(hashes.tolist())) == 7


def test_normalise():
    assert normalise("  Hello, World！\n你好，世界。 ") == "helloworld你好世界"
    assert normalise("？？") == "？？" and normalise("！！") == "！！"


def test_exact_duplicates_up_to_case_space_and_punctuation(news):
    a, b = news[0], news[1]
    texts = [a, b, "Hello World 你好", f"  {a} ！！", a.replace("，", " , "), "hello, world!你好。", b]
    kept, removed, stats = dedup_table(table(texts), "pretrain")
    got = removed_by_id(removed)
    assert {i: (r["reason"], r["duplicate_of"], r["similarity"]) for i, r in got.items()} == {
        "d:3": ("exact", "d:0", 1.0), "d:4": ("exact", "d:0", 1.0),
        "d:5": ("exact", "d:2", 1.0), "d:6": ("exact", "d:1", 1.0)}
    assert kept.column("id").to_pylist() == ["d:0", "d:1", "d:2"]
    assert removed.column("text").to_pylist()[0] == texts[3]     # removed rows keep their columns
    assert stats["removed_exact"] == 4 and stats["removed_near"] == 0


def test_near_duplicates_are_removed_and_unrelated_texts_kept(news):
    rng = random.Random(0)
    originals = news[:200]
    copies = [substitute(t, 0.05, rng) for t in originals[:100]]
    kept, removed, stats = dedup_table(table(originals + copies, width=3), "pretrain")
    got = removed_by_id(removed)
    # Every original is kept; the copies, and only they, go as near duplicates of their
    # original. MinHash is an estimate: the benchmark measures ~98% recall at this length.
    assert set(kept.column("id").to_pylist()) >= {f"d:{i:03d}" for i in range(200)}
    assert set(got) <= {f"d:{200 + i:03d}" for i in range(100)}
    assert len(got) >= 95
    for i in range(100):
        row = got.get(f"d:{200 + i:03d}")
        if row is not None:
            assert row["reason"] == "near" and row["duplicate_of"] == f"d:{i:03d}"
            assert Params().threshold <= row["similarity"] < 1
            assert row["text"] == copies[i]
    assert stats["rows_in"] == 300 == stats["rows_kept"] + stats["rows_removed"]
    assert stats["rows_removed"] == stats["removed_exact"] + stats["removed_near"] == len(got)


def test_first_member_of_a_cluster_is_kept(news):
    near = substitute(news[0], 0.03, random.Random(1))
    _, removed, _ = dedup_table(table([news[0], near, news[1]]), "pretrain")
    assert [(r["id"], r["duplicate_of"]) for r in removed.to_pylist()] == [("d:1", "d:0")]
    _, removed, _ = dedup_table(table([near, news[1], news[0], news[0]]), "pretrain")
    assert [(r["id"], r["reason"], r["duplicate_of"]) for r in removed.to_pylist()] == [
        ("d:2", "near", "d:0"), ("d:3", "exact", "d:2")]


def test_sft_compares_prompt_and_response(news):
    rows = [
        {"id": "s:0", "source": "s", "prompt": "成语“一心一意”是什么意思？", "response": "形容专心。"},
        {"id": "s:1", "source": "s", "prompt": "成语“一心一意”是什么意思？", "response": "完全不同的另一个回答。"},
        {"id": "s:2", "source": "s", "prompt": "成语 “一心一意” 是什么意思?", "response": "形容专心！"},
        {"id": "s:3", "source": "s", "prompt": "总结下面这段话：", "response": news[0]},
        {"id": "s:4", "source": "s", "prompt": "总结下面这段话：",
         "response": substitute(news[0], 0.03, random.Random(4))},
    ]
    kept, removed, stats = dedup_table(rows_table(rows, "sft"), "sft")
    assert kept.column("id").to_pylist() == ["s:0", "s:1", "s:3"]
    got = removed_by_id(removed)
    assert (got["s:2"]["reason"], got["s:2"]["duplicate_of"]) == ("exact", "s:0")
    assert (got["s:4"]["reason"], got["s:4"]["duplicate_of"]) == ("near", "s:3")
    assert set(removed.column_names) >= {"prompt", "response", "system", "history", "reason", "duplicate_of",
                                         "similarity"}
    assert stats["rows_in"] == 5 == stats["rows_kept"] + stats["rows_removed"]


def test_short_and_empty_texts(news):
    texts = ["谢谢", "谢文", "好", "好", "", "", "！！", "？？"]
    kept, removed, stats = dedup_table(table(texts), "pretrain", Params(ngram=5))
    assert [(r["id"], r["duplicate_of"]) for r in removed.to_pylist()] == [("d:3", "d:2"), ("d:5", "d:4")]
    assert stats["rows_kept"] == 6


def test_empty_table_and_stats():
    kept, removed, stats = dedup_table(table([]), "pretrain")
    assert kept.num_rows == removed.num_rows == 0
    assert {"reason", "duplicate_of", "similarity"} <= set(removed.column_names)
    assert stats["rows_in"] == stats["rows_kept"] == stats["rows_removed"] == 0
    assert stats["params"]["ngram"] == dedup.DEFAULTS["ngram"]


def test_schema_defaults_are_the_library_s():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    defaults = {k: v["default"] for k, v in schema["properties"]["dedup"]["properties"].items()}
    assert {k: v for k, v in defaults.items() if k != "band_jobs"} == {
        k: v for k, v in dedup.DEFAULTS.items() if k != "seed"}


def test_order_is_by_id_not_by_position(news):
    near = substitute(news[0], 0.03, random.Random(1))
    rows = [{"id": "b", "source": "t", "text": news[0]}, {"id": "a", "source": "t", "text": near},
            {"id": "c", "source": "t", "text": news[0]}]
    _, removed, _ = dedup_table(rows_table(rows, "pretrain"), "pretrain")
    # "a" is first in id order: "b" goes as its near duplicate, "c" as an exact one of "b".
    assert [(r["id"], r["reason"], r["duplicate_of"]) for r in removed.to_pylist()] == [
        ("b", "near", "a"), ("c", "exact", "b")]


def test_short_texts_are_compared_by_characters():
    texts = ["这家酒店的服务很好", "这家酒店的服务真好", "我很喜欢这本书的故事", "我很喜欢那本书的故事"]
    _, removed, _ = dedup_table(table(texts), "pretrain", Params(short_similarity=0.85))
    # One character of nine or ten, inside the text: character similarity 0.89 / 0.9, while
    # two of eight or nine bigrams change (Jaccard 0.6 / 0.64).
    assert {(r["id"], r["duplicate_of"]) for r in removed.to_pylist()} == {("d:1", "d:0"), ("d:3", "d:2")}
    _, removed, _ = dedup_table(table(texts), "pretrain", Params(short_similarity=0.95, threshold=0.9))
    assert removed.num_rows == 0


# --- the stages against the single-process reference ------------------------------------


def shard(t: pa.Table, n: int) -> list[pa.Table]:
    """Contiguous slices, as clean_shard makes them (some empty when n > rows)."""
    bounds = [round(i * t.num_rows / n) for i in range(n + 1)]
    return [t.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_corpus():
    """The tiny DAG's pretraining sources and planted rows, and 300 planted near and exact copies
    of real demo news in a source of their own (so cross-source duplicates too)."""
    sources = {name: [{"id": r["id"], "source": f"demo_{name}", "text": clean_text(r["text"])}
                      for r in demo.build(name)[:limit]] for name, limit in (("news", 600), ("reviews", 400),
                                                                            ("idioms", 400))}
    a, b, c = [r["text"] for r in demo.news()[5000:] if len(r["text"]) > 150][:3]
    rng = random.Random(0)
    chars = list(b)
    for i in rng.sample(range(len(chars)), k=len(chars) // 20):
        chars[i] = "龘"
    sources["planted"] = [{"id": f"planted:{k}", "source": "planted", "text": t} for k, t in
                          (("a", a), ("b", b), ("c", c), ("a_copy", f"  {a} ！！"), ("b_near", "".join(chars)))]
    originals = [r for r in demo.build("news")[1000:] if len(r["text"]) >= 40][:300]
    rng = random.Random(5)
    copies = []
    for k, r in enumerate(originals):
        text = substitute(r["text"], 0.05, rng) if k % 3 else r["text"].replace("，", " , ") + "。"
        copies.append({"id": f"x-copy:{k:03d}", "source": "copies", "text": text})
    originals = [{**r, "source": "copies"} for r in originals]
    sources["copies"] = originals[:150] + copies + originals[150:]   # originals in the copies' source too
    return {name: rows_table(rows, "pretrain") for name, rows in sources.items()}


def by_id(t: pa.Table) -> dict:
    return {r["id"]: (r["reason"], r["duplicate_of"], r["similarity"]) for r in t.to_pylist()}


@pytest.fixture(scope="module")
def reference(tiny_corpus):
    return dedup_table(pa.concat_tables(tiny_corpus.values()), "pretrain")


@pytest.mark.parametrize("n_shards", [1, 3, 7])
def test_stages_give_the_reference_s_result_for_any_number_of_shards(tiny_corpus, reference, n_shards):
    kept, removed, stats = dedup_shards({s: shard(t, n_shards) for s, t in tiny_corpus.items()}, "pretrain",
                                        band_jobs=n_shards)
    ref_kept, ref_removed, ref_stats = reference
    assert pa.concat_tables(t for ts in kept.values() for t in ts).equals(ref_kept)
    assert pa.concat_tables(t for ts in removed.values() for t in ts).equals(ref_removed)
    got = by_id(ref_removed)
    assert got["planted:a_copy"][:2] == ("exact", "planted:a")
    assert got["planted:b_near"][:2] == ("near", "planted:b")
    assert sum(r[0] == "near" for k, r in got.items() if k.startswith("x-copy:")) >= 190
    assert sum(r[0] == "exact" for k, r in got.items() if k.startswith("x-copy:")) >= 95
    # The counts add up, per shard and in total, and equal the reference's.
    assert len(stats["shards"]) == n_shards * len(tiny_corpus)
    for st in stats["shards"].values():
        assert st["rows_in"] == st["rows_kept"] + st["rows_removed"]
        assert st["rows_removed"] == st["removed_exact"] + st["removed_near"]
    for key in ("rows_in", "rows_kept", "rows_removed", "removed_exact", "removed_near"):
        assert stats[key] == ref_stats[key] == sum(st[key] for st in stats["shards"].values())
    assert stats["rows_in"] == sum(t.num_rows for t in tiny_corpus.values())


def test_empty_shards_and_sources(news):
    t = table(news[:3] + [news[0]])
    kept, removed, stats = dedup_shards({"empty": [table([], "e")], "few": shard(t, 7)}, "pretrain", band_jobs=3)
    assert [k.num_rows for k in kept["few"]] == [1, 0, 1, 0, 1, 0, 0] and kept["empty"][0].num_rows == 0
    assert [r.num_rows for r in removed["few"]] == [0, 0, 0, 0, 0, 0, 1]
    assert stats["rows_in"] == 4 and stats["rows_removed"] == stats["removed_exact"] == 1
    kept, removed, stats = dedup_shards({"empty": [table([]), table([])]}, "pretrain")
    assert stats["rows_in"] == stats["rows_kept"] == 0
    assert {"reason", "duplicate_of", "similarity"} <= set(removed["empty"][0].column_names)


def test_recall_of_planted_copies_and_distinct_removed():
    """≥ 95% of copies with 5% of their characters substituted are found, and ≤ 1% of the
    distinct documents of the corpus itself removed (benchmarks/bench_dedup.py measures more)."""
    rows = [{"id": r["id"], "source": name, "text": clean_text(r["text"])}
            for name in ("news", "reviews") for r in demo.build(name)[:4000]]
    rng = random.Random(7)
    originals = rng.sample(rows, 600)
    copies = [{"id": f"planted:{k}", "source": "planted", "text": substitute(r["text"], 0.05, rng)}
              for k, r in enumerate(originals)]
    _, removed, _ = dedup_shards({"rows": shard(rows_table(rows + copies, "pretrain"), 3)}, "pretrain")
    dup_of = {r["id"]: r["duplicate_of"] for t in removed["rows"] for r in t.to_pylist()}

    def root(i):
        while i in dup_of:
            i = dup_of[i]
        return i
    found = [(c["id"] in dup_of or o["id"] in dup_of) and root(c["id"]) == root(o["id"])
             for c, o in zip(copies, originals)]
    assert sum(found) / len(found) >= 0.95
    _, _, stats = dedup_shards({"rows": shard(rows_table(rows, "pretrain"), 3)}, "pretrain")
    assert stats["removed_near"] / (stats["rows_in"] - stats["removed_exact"]) <= 0.01


def test_a_bucket_gives_pairs_in_proportion_to_its_rows():
    """Each of a bucket's first ANCHORS rows is paired with every later row: 2m − 3 pairs for
    m rows sharing a key, not m(m − 1)/2, so a common key cannot make the pairs grow quadratically."""
    m = 500
    sigs = pl.DataFrame({"ptr": list(range(m, 0, -1)), "lsh_0": [7] * m}, schema={"ptr": pl.Int64, "lsh_0": pl.UInt64})
    exact = pl.DataFrame({"ptr": [3]}, schema={"ptr": pl.Int64})  # exact duplicates are left out
    pairs = dedup.candidate_pairs(sigs.lazy(), exact.lazy(), ["lsh_0"])
    assert len(pairs) == 2 * (m - 1) - 3
    assert set(pairs.filter(pl.col("a") == 1)["b"]) == set(range(2, m + 1)) - {3}
    assert set(pairs["a"]) == {1, 2}
