"""Byte-level BPE learned from jieba word counts, saved as Hugging Face tokenizer files.

Merges are learned over word types weighted by their counts, so no merge crosses a
jieba word boundary. The alphabet is the 256 GPT-2 byte symbols, so every string
encodes (no unknown token) and decodes back to itself.
"""
from __future__ import annotations

import collections
import heapq
import os
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from zhlm.io import atomic_path, write_json
from zhlm.tokenizer.chat import EOT, IM_END, IM_START
from zhlm.tokenizer.word_counts import count_words, load_word_counts

SPECIAL_TOKENS = [EOT, IM_START, IM_END]

# ChatML, as in Qwen: each message is <|im_start|>{role}\n{content}<|im_end|>\n
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's split pattern: a letter run keeps one leading non-letter (space or punctuation),
# digits stand alone, punctuation runs keep their trailing newlines, whitespace runs
# leave their last space to the next word. CJK characters are letters (\p{L}).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer used both to split training words and to encode text."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def pretoken_counts(word_counts: Mapping[str, int]) -> dict[str, int]:
    """Split each word exactly as encoding will, into byte-level pre-tokens, summing counts."""
    pt = pre_tokenizer()
    out: collections.Counter = collections.Counter()
    for word, count in word_counts.items():
        for piece, _ in pt.pre_tokenize_str(word):
            out[piece] += count
    return dict(out)


# Pairs of token ids are packed into one int, (a << ID_BITS) | b, and heap entries into
# pair - count * 2**PAIR_BITS: plain ints take far less memory than tuples and compare
# faster, and the heap order (highest count first, then smallest pair) stays the same.
ID_BITS = 20
PAIR_BITS = 2 * ID_BITS
ID_MASK = (1 << ID_BITS) - 1
PAIR_MASK = (1 << PAIR_BITS) - 1


def _merge_word(w: list[int], a: int, b: int, new: int, count: int, delta: dict[int, int]) -> bool:
    """Merge (a, b) in place, left to right as the BPE model does when encoding.

    Only the pairs next to a merge site change; their weighted changes go to `delta`
    (changes to (a, b) itself are skipped: that pair is retired as a whole).
    Returns whether anything merged.
    """
    merged = False
    k = 0
    while k < len(w) - 1:
        if w[k] == a and w[k + 1] == b:
            if k > 0:
                left = w[k - 1] << ID_BITS
                delta[left | a] -= count
                delta[left | new] += count
            if k + 2 < len(w):
                right = w[k + 2]
                delta[(b << ID_BITS) | right] -= count
                delta[(new << ID_BITS) | right] += count
            w[k:k + 2] = [new]
            merged = True
        k += 1
    return merged


def train_bpe(
    word_counts: Mapping[str, int], vocab_size: int, *, min_frequency: int = 2
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges inside words, weighted by the words' counts.

    Returns (vocab, merges): vocab is SPECIAL_TOKENS (ids 0..2), the 256 byte symbols,
    then merged tokens, at most `vocab_size` entries. Each step merges the most frequent
    adjacent pair, ties going to the pair with the smaller ids (deterministic); training
    stops early when no pair occurs `min_frequency` times.
    """
    byte_symbols = [bytes_to_unicode()[b] for b in range(256)]
    base = len(SPECIAL_TOKENS) + len(byte_symbols)
    if not base <= vocab_size <= ID_MASK:
        raise ValueError(f"vocab_size must be between {base} (specials + 256 bytes) and {ID_MASK}")
    tokens: list[str] = SPECIAL_TOKENS + byte_symbols  # id -> token string
    vocab = {t: i for i, t in enumerate(tokens)}

    # Word types as lists of token ids; sorted so the result never depends on input order.
    pieces = sorted(pretoken_counts(word_counts).items())
    words = [[vocab[ch] for ch in piece] for piece, _ in pieces]
    counts = [c for _, c in pieces]
    del pieces

    # Incremental state: pair -> weighted count, pair -> words holding it, and a heap.
    # `where` is cleaned lazily (lists may repeat a word or name one that lost the pair;
    # merging such a word is a no-op), which is cheaper than exact sets.
    pair_counts: dict[int, int] = collections.defaultdict(int)
    where: dict[int, list[int]] = collections.defaultdict(list)
    for i, w in enumerate(words):
        for x, y in zip(w, w[1:]):
            pair = (x << ID_BITS) | y
            pair_counts[pair] += counts[i]
            where[pair].append(i)
    heap = [pair - (c << PAIR_BITS) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        entry = heapq.heappop(heap)
        pair, count = entry & PAIR_MASK, -(entry >> PAIR_BITS)
        current = pair_counts.get(pair, 0)
        if current != count:
            # Stale entry: counts of existing pairs only fall, so re-queue with the true count.
            if current > 0:
                heapq.heappush(heap, pair - (current << PAIR_BITS))
            continue
        if current < min_frequency:
            break
        a, b = pair >> ID_BITS, pair & ID_MASK
        merged = tokens[a] + tokens[b]
        new = vocab.get(merged)  # the same string can arise from two different merges
        if new is None:
            new = len(tokens)
            tokens.append(merged)
            vocab[merged] = new
        merges.append((tokens[a], tokens[b]))

        delta: dict[int, int] = collections.defaultdict(int)
        for i in set(where.pop(pair)):
            w = words[i]
            if _merge_word(w, a, b, new, counts[i], delta):
                for x, y in zip(w, w[1:]):
                    if x == new or y == new:  # the only pairs this word did not hold before
                        where[(x << ID_BITS) | y].append(i)
        del pair_counts[pair]
        delta.pop(pair, None)
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts[p] + d
            if c > 0:
                pair_counts[p] = c
            else:
                del pair_counts[p]
                where.pop(p, None)
            if d > 0:  # only pairs that grew need a fresh heap entry
                heapq.heappush(heap, p - (c << PAIR_BITS))
    return vocab, merges


def build_tokenizer(vocab: Mapping[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers.Tokenizer`: BPE without unk, our split + ByteLevel, special tokens never split."""
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_from_counts(
    word_counts: Mapping[str, int], vocab_size: int, *, min_frequency: int = 2
) -> tuple[Tokenizer, dict]:
    """Train on word counts and build the tokenizer; returns (tokenizer, stats)."""
    t0 = time.perf_counter()
    vocab, merges = train_bpe(word_counts, vocab_size, min_frequency=min_frequency)
    tok = build_tokenizer(vocab, merges)
    stats = {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": vocab_size,
        "merges": len(merges),
        "min_frequency": min_frequency,
        "words": len(word_counts),
        "word_occurrences": int(sum(word_counts.values())),
        "bpe_seconds": round(time.perf_counter() - t0, 3),
    }
    return tok, stats


def build_from_texts(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    processes: int = 1,
    max_words: int = 200_000,
    chunk_size: int = 1000,
) -> tuple[Tokenizer, dict[str, int], dict]:
    """Count jieba words over `texts`, then train; returns (tokenizer, word_counts, stats)."""
    t0 = time.perf_counter()
    counts = count_words(texts, processes=processes, max_words=max_words, chunk_size=chunk_size)
    count_seconds = time.perf_counter() - t0
    tok, stats = build_from_counts(counts, vocab_size, min_frequency=min_frequency)
    stats["count_seconds"] = round(count_seconds, 3)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return tok, counts, stats


def build_from_counts_file(
    counts_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> dict:
    """Train on a word_counts.parquet and write the tokenizer files into `out_dir`; returns stats."""
    t0 = time.perf_counter()
    tok, stats = build_from_counts(load_word_counts(counts_path), vocab_size, min_frequency=min_frequency)
    save_tokenizer(tok, out_dir, model_max_length=model_max_length)
    stats["model_max_length"] = model_max_length
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, *, model_max_length: int = 2048) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json, each atomically."""
    out = Path(out_dir)
    with atomic_path(out / "tokenizer.json") as tmp:
        tmp.write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    write_json({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }, out / "tokenizer_config.json")
    write_json({
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
    }, out / "special_tokens_map.json")
