"""Tokenizer stage: jieba word counts (word_counts.py) -> byte-level BPE and the
Hugging Face tokenizer files (bpe.py); ChatML conversations (chat.py)."""
