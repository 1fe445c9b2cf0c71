"""Bits per character: a loss comparable across tokenizers.

Per-token loss depends on how much text a token covers; dividing the summed
negative log-likelihood by the characters it explains does not.
"""
from __future__ import annotations

import collections
import math

import numpy as np
from tokenizers import Tokenizer

from zhlm.lm import bits_per_character, stream_nats
from zhlm.tokenizer.chat import EOT


def token_stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """The texts as binarize writes them (each followed by <|endoftext|>), after a leading <|endoftext|>.

    The leading <|endoftext|> is context only, so the first document's first
    token is predicted too, from the same context every other document has.
    """
    eot = tokenizer.token_to_id(EOT)
    ids = [eot]
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += encoding.ids + [eot]
    return np.asarray(ids, dtype=np.int64)


def evaluate_bpc(model, tokenizer: Tokenizer, texts: list[str], *, seq_len: int, batch_size: int = 8) -> dict:
    """Bits per character of `texts` under the model.

    Characters: those of the texts plus one per document for its <|endoftext|>
    (the model predicts the end of every document; the unigram baseline counts
    it the same way). Empty texts are skipped, as binarize skips them.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no text to measure bits per character on")
    tokens = token_stream(tokenizer, texts)
    nats, predicted = stream_nats(model, tokens, seq_len, batch_size)
    chars = sum(len(t) for t in texts) + len(texts)
    return {"bpc": bits_per_character(nats, chars), "nats": nats, "tokens": predicted, "chars": chars,
            "documents": len(texts), "tokens_per_char": predicted / chars}


def unigram_bpc(train_texts: list[str], val_texts: list[str]) -> float:
    """Bits per character of an add-one-smoothed character unigram model (a baseline).

    The symbols are the characters of both sets plus an end-of-document symbol,
    one per document, counted as in evaluate_bpc; smoothing gives unseen
    validation characters their share of the mass.
    """
    end = None  # the end-of-document symbol; no character equals it
    counts = collections.Counter()
    for text in train_texts:
        if text:
            counts.update(text)
            counts[end] += 1
    val_counts = collections.Counter()
    for text in val_texts:
        if text:
            val_counts.update(text)
            val_counts[end] += 1
    if not val_counts:
        raise ValueError("no validation text")
    vocabulary = set(counts) | set(val_counts)
    total = sum(counts.values()) + len(vocabulary)
    bits = -sum(n * math.log2((counts[symbol] + 1) / total) for symbol, n in val_counts.items())
    return bits / sum(val_counts.values())
