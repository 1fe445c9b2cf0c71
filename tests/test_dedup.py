import random

import numpy as np
import pytest
from datasketch import MinHash

from zhlm.data import dedup, demo
from zhlm.data.dedup import dedup_table, normalise, shingle_hashes, signatures
from zhlm.data.schema import rows_table


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


def table(texts, prefix="d"):
    return rows_table([{"id": f"{prefix}:{i}", "source": "t", "text": t} for i, t in enumerate(texts)], "pretrain")


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
    kept, removed, stats = dedup_table(table(originals + copies), "pretrain")
    got = removed_by_id(removed)
    # Every original is kept; the copies, and only they, go as near duplicates of their
    # original. MinHash is an estimate: the benchmark measures ~98% recall at this length.
    assert set(kept.column("id").to_pylist()) >= {f"d:{i}" for i in range(200)}
    assert set(got) <= {f"d:{200 + i}" for i in range(100)}
    assert len(got) >= 95
    for i in range(100):
        row = got.get(f"d:{200 + i}")
        if row is not None:
            assert row["reason"] == "near" and row["duplicate_of"] == f"d:{i}"
            assert dedup.DEFAULTS["threshold"] <= row["similarity"] < 1
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


def test_deterministic_across_runs_and_processes(news, monkeypatch):
    rng = random.Random(2)
    texts = news + [substitute(t, 0.05, rng) for t in news[:60]] + news[:20]
    rng.shuffle(texts)
    monkeypatch.setattr(dedup, "_CHUNK_TEXTS", 64)   # several chunks, so the pool is used
    results = [dedup_table(table(texts), "pretrain", processes=p) for p in (1, 2, 1)]
    for kept, removed, stats in results[1:]:
        assert kept.equals(results[0][0]) and removed.equals(results[0][1]) and stats == results[0][2]
    assert results[0][2]["removed_exact"] == 20 and results[0][2]["removed_near"] >= 55


def test_band_prefilter_changes_nothing(news, monkeypatch):
    rng = random.Random(3)
    texts = news[:150] + [substitute(t, 0.08, rng) for t in news[:150]]
    expected = dedup_table(table(texts), "pretrain", ngram=3, threshold=0.6)
    monkeypatch.setattr(dedup, "_shares_a_band", lambda sigs, ranges: np.ones(len(sigs), dtype=bool))
    got = dedup_table(table(texts), "pretrain", ngram=3, threshold=0.6)
    assert got[0].equals(expected[0]) and got[1].equals(expected[1])


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
    kept, removed, stats = dedup_table(table(texts), "pretrain", ngram=5)
    assert [(r["id"], r["duplicate_of"]) for r in removed.to_pylist()] == [("d:3", "d:2"), ("d:5", "d:4")]
    assert stats["rows_kept"] == 6


def test_empty_table_and_stats():
    kept, removed, stats = dedup_table(table([]), "pretrain")
    assert kept.num_rows == removed.num_rows == 0
    assert {"reason", "duplicate_of", "similarity"} <= set(removed.column_names)
    assert stats["rows_in"] == stats["rows_kept"] == stats["rows_removed"] == 0
    assert stats["params"]["ngram"] == dedup.DEFAULTS["ngram"]
