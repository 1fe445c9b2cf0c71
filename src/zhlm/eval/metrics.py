"""Answer metrics: exact match, character F1, word segmentation F1, polarity labels, entity
precision/recall/F1 (and jieba's entities, the baseline that needs no training), loops.

Chinese answers have no natural word boundaries, so overlap is counted over
characters (as in CMRC / DuReader), not over whitespace tokens.
"""
from __future__ import annotations

import collections
import math
import re
import unicodedata

from zhlm.data.demo import ENTITY_LABELS, NO_ENTITY

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """NFKC (full-width → half-width), strip, collapse whitespace to one space, lowercase."""
    text = unicodedata.normalize("NFKC", text or "")
    return _SPACES.sub(" ", text.strip()).lower()


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


def _content_chars(text: str) -> list[str]:
    """Characters of the normalised text, without whitespace and punctuation."""
    return [c for c in normalize_answer(text)
            if not c.isspace() and not unicodedata.category(c).startswith("P")]


def char_f1(pred: str, ref: str) -> float:
    """F1 of the multiset overlap of characters (whitespace and punctuation ignored).

    Two answers with no content characters match (1.0); one empty side scores 0.
    """
    p, r = _content_chars(pred), _content_chars(ref)
    if not p or not r:
        return float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def word_spans(segmented: str) -> set[tuple[int, int, str]]:
    """(start, end, word) of each whitespace-separated word, offsets in the space-free string."""
    spans, start = set(), 0
    for word in normalize_answer(segmented).split():
        spans.add((start, start + len(word), word))
        start += len(word)
    return spans


def segmentation_counts(pred: str, gold: str) -> tuple[int, int, int]:
    """(correct words, predicted words, gold words), for micro-averaging over sentences.

    A predicted word is correct when the same word occupies the same character
    offsets of the space-free gold string. Offsets are taken over each side's own
    characters: if the model changed, dropped or added characters, the words after
    the change are shifted and count as wrong, and a word whose characters differ
    never counts, even at the right offsets.
    """
    p, g = word_spans(pred), word_spans(gold)
    return len(p & g), len(p), len(g)


def prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def segmentation_f1(pred: str, gold: str) -> tuple[float, float, float]:
    """(precision, recall, F1) of the predicted words of one sentence (see segmentation_counts)."""
    return prf(*segmentation_counts(pred, gold))


# --- entities ------------------------------------------------------------------

_ENTITY_KIND = {label: kind for kind, label in ENTITY_LABELS.items()}
_ENTITY_LINE = re.compile(r"^\s*(" + "|".join(ENTITY_LABELS.values()) + r")\s*[:：]\s*(.*)$")
_ENTITY_SPLIT = re.compile(r"[、，,;；/\s]+")


def parse_entities(text: str | None) -> dict[str, set[str]] | None:
    """The entities an answer in zhlm.data.demo.format_entities' format names: {type: names}.

    Each line `人名：A、B` gives its type's names (a full- or half-width colon; names split by
    、 or a comma, semicolon, slash or space; `无` or nothing: none). A type whose line is missing
    has none; a later line of the same type adds to it. None when no line has the format (the
    answer is not in it at all), so that such answers can be counted.
    """
    found: dict[str, set[str]] = {kind: set() for kind in ENTITY_LABELS}
    matched = False
    for line in (text or "").splitlines():
        m = _ENTITY_LINE.match(unicodedata.normalize("NFKC", line))
        if not m:
            continue
        matched = True
        names = {n for n in _ENTITY_SPLIT.split(m.group(2)) if n and n != NO_ENTITY}
        found[_ENTITY_KIND[m.group(1)]] |= names
    return found if matched else None


def entity_counts(pred: dict[str, set[str]] | None, gold: dict[str, set[str]]) -> dict[str, tuple[int, int, int]]:
    """(correct, predicted, gold) entities of each type in one sentence, for micro-averaging.

    An entity is a (type, name) pair, names compared after NFKC; a sentence's repeats count once.
    An unparsable answer (None) predicts nothing.
    """
    def norm(names):
        return {unicodedata.normalize("NFKC", n).strip() for n in names}

    pred = pred or {}
    counts = {}
    for kind in ENTITY_LABELS:
        p, g = norm(pred.get(kind, ())), norm(gold.get(kind, ()))
        counts[kind] = (len(p & g), len(p), len(g))
    return counts


def entity_scores(counts: list[dict[str, tuple[int, int, int]]]) -> dict:
    """Precision, recall and F1 over sentences' entity_counts: per type, and micro over all
    types (every entity of every sentence pooled)."""
    totals = {kind: [sum(c[kind][k] for c in counts) for k in range(3)] for kind in ENTITY_LABELS}
    scores = {}
    for name, (correct, predicted, gold) in [*totals.items(), ("micro", [sum(t[k] for t in totals.values())
                                                                          for k in range(3)])]:
        precision, recall, f1 = prf(correct, predicted, gold)
        scores[name] = {"precision": precision, "recall": recall, "f1": f1,
                        "correct": correct, "predicted": predicted, "gold": gold}
    return scores


# jieba's part-of-speech tags of each type: nr and its variants (nrt transliterated, nrfg), ns, nt.
JIEBA_ENTITY_TAGS = {"person": ("nr",), "place": ("ns",), "organization": ("nt",)}


def jieba_entities(sentence: str) -> dict[str, set[str]]:
    """The baseline that needs no training: every word jieba's own part-of-speech tagger tags as
    a person (nr, nrt, nrfg), place (ns) or organisation (nt)."""
    import jieba
    import jieba.posseg

    jieba.setLogLevel(60)  # its dictionary-loading messages
    found: dict[str, set[str]] = {kind: set() for kind in ENTITY_LABELS}
    for word, flag in jieba.posseg.cut(sentence):
        for kind, prefixes in JIEBA_ENTITY_TAGS.items():
            if flag.startswith(prefixes):
                found[kind].add(word)
    return found


POLARITY_LABELS = ("正面", "负面")


def polarity_label(text: str) -> str | None:
    """The first of 正面 / 负面 in the answer, or None when it has neither."""
    text = normalize_answer(text)
    found = [(text.find(label), label) for label in POLARITY_LABELS if label in text]
    return min(found)[1] if found else None


# A loop: a unit of at most LOOP_MAX_PERIOD characters repeated back-to-back at least
# LOOP_MIN_REPEATS times, over at least LOOP_MIN_CHARS characters. The character floor keeps
# natural doubling (谢谢谢谢, 哈哈哈哈哈) out; greedy loops run on to the token limit, far past it.
LOOP_MAX_PERIOD = 16
LOOP_MIN_REPEATS = 3
LOOP_MIN_CHARS = 10


def loop_unit(text: str | None) -> str | None:
    """The unit the answer loops on, or None when it does not loop.

    Whitespace is ignored (so "王 王 王 …" loops on 王). The answer loops when some run of
    characters repeats itself with a period p of 1 to LOOP_MAX_PERIOD (every character of the
    run equals the one p before it) over at least max(LOOP_MIN_REPEATS·p, LOOP_MIN_CHARS)
    characters; the run may end in part of a unit, as an answer cut at the token limit does.
    The shortest such period wins, so 你你你… gives 你, not 你你.
    """
    chars = "".join((text or "").split())
    for period in range(1, LOOP_MAX_PERIOD + 1):
        needed = max(LOOP_MIN_REPEATS * period, LOOP_MIN_CHARS)
        run = 0  # characters in a row equal to the one `period` before them
        for i in range(period, len(chars)):
            run = run + 1 if chars[i] == chars[i - period] else 0
            if run + period >= needed:
                start = i + 1 - run - period
                return chars[start:start + period]
    return None


def looping_share(answers: list[str]) -> float | None:
    """Share of the answers that loop (loop_unit); None for no answers."""
    return sum(loop_unit(a) is not None for a in answers) / len(answers) if answers else None


def paired_difference(before: list[float], after: list[float]) -> tuple[float, float]:
    """The mean of after − before over paired items, and its standard error (the spread of the
    per-item differences / √n): two models scored on the same items differ by chance by about
    that much, far less than two independent samples would."""
    diffs = [a - b for b, a in zip(before, after, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)
