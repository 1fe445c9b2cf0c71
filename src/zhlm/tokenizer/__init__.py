"""Tokenizer stage: jieba word counts -> byte-level BPE -> Hugging Face tokenizer files."""
from zhlm.tokenizer.bpe import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    build_from_counts,
    build_from_texts,
    build_tokenizer,
    save_tokenizer,
    train_bpe,
)
from zhlm.tokenizer.word_counts import count_words, iter_parquet_texts, load_word_counts, save_word_counts

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "SPLIT_PATTERN",
    "build_from_counts",
    "build_from_texts",
    "build_tokenizer",
    "count_words",
    "iter_parquet_texts",
    "load_word_counts",
    "save_tokenizer",
    "save_word_counts",
    "train_bpe",
]
