"""Retrieval over the user's documents: passages, a BM25 index over jieba words, the reference
message put into a prompt.

Documents are a folder of .txt and .md files (read recursively; hidden files and folders are
skipped) or one parquet file with a `text` column and, if present, an `id` column. Each document
is cut into passages of whole lines of at most PASSAGE_CHARS characters (a longer line is cut at
sentence ends, and a sentence longer still is cut hard). A passage's id is `<document>#<n>`, n
counting from 1: `notes/faq.md#3` for a file, `idiom:画蛇添足#1` for a parquet row with that id
(a parquet file without ids names its rows by number: `3#1`).

The index is bm25s (BM25, sparse matrices) over jieba's words (`jieba.lcut`, as the tokenizer's
word counts), punctuation left out. It is built once and cached on disk under
$XDG_CACHE_HOME/zhlm/retrieval/<hash of the documents' absolute path>/ (~/.cache when unset):
not beside the documents, whose folder may be read-only and whose files are all documents. The
cache is rebuilt when the documents' fingerprint changes: a hash of every document file's
relative name and content (contents, not sizes and mtimes, which a copy that keeps mtimes, or an
edit within the clock's resolution, would leave unchanged), of the passage size and of the
index format. Reading every file to hash it is far cheaper than segmenting it again.

The best passages go into the conversation's system message, "参考资料：\n[id] passage…", within
a character budget, and shorter still where the prompt would not leave the answer its room in
the model's context.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from zhlm.io import sha256_file
from zhlm.tokenizer.chat import encode_prompt
from zhlm.tokenizer.word_counts import init_jieba

log = logging.getLogger(__name__)

PASSAGE_CHARS = 256  # longest passage: a few short paragraphs, a fraction of a small model's context
TOP_K = 3  # passages searched for a prompt
REFERENCE_CHARS = 1000  # most characters of the reference message
MIN_CUT_CHARS = 16  # a passage cut to fit the budget keeps at least this much, else it is left out
DOC_SUFFIXES = (".txt", ".md")
HEADER = "参考资料："
INDEX_VERSION = 1  # part of the fingerprint: a new index format rebuilds old caches

_SENTENCE_END = re.compile(r"(?<=[。！？!?；;])")
_WORD = re.compile(r"\w")  # a jieba word with a letter, digit or CJK character; not punctuation or space


@dataclass(frozen=True)
class Passage:
    id: str  # <document>#<n>
    doc: str  # the document's id: a file's path relative to the folder, or a parquet row's id
    text: str


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # BM25 score, > 0


# --- documents and passages ------------------------------------------------------------------

def document_files(path: str | os.PathLike) -> list[Path]:
    """The document files of a folder (sorted), or the parquet file itself."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path}: documents are a folder of .txt/.md files or a .parquet file")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder or file")
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in DOC_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def read_documents(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(document id, text) of every document under `path`."""
    path = Path(path)
    files = document_files(path)
    if path.is_file():
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"{path}: no `text` column; the documents' text must be in one")
        texts = table.column("text").to_pylist()
        ids = table.column("id").to_pylist() if "id" in table.column_names else range(len(texts))
        return [(str(i), t) for i, t in zip(ids, texts) if t]
    return [(f.relative_to(path).as_posix(), f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _pieces(line: str, max_chars: int) -> list[str]:
    """A line cut into pieces of at most max_chars: at sentence ends where it can, else hard."""
    if len(line) <= max_chars:
        return [line]
    pieces = []
    for sentence in filter(None, _SENTENCE_END.split(line)):
        pieces += [sentence[i:i + max_chars] for i in range(0, len(sentence), max_chars)]
    return pieces


def split_passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive non-empty lines joined into passages of at most max_chars characters (a longer
    line is cut at sentence ends, a longer sentence hard)."""
    passages, current = [], ""
    for line in filter(None, map(str.strip, text.splitlines())):
        for i, piece in enumerate(_pieces(line, max_chars)):
            joint = "" if i else "\n"  # the pieces of one line are joined as they were
            if current and len(current) + len(joint) + len(piece) > max_chars:
                passages.append(current)
                current = ""
            current = current + joint + piece if current else piece
    if current:
        passages.append(current)
    return passages


def passages_of(documents: list[tuple[str, str]], max_chars: int = PASSAGE_CHARS) -> list[Passage]:
    return [Passage(f"{doc}#{n}", doc, text) for doc, body in documents
            for n, text in enumerate(split_passages(body, max_chars), start=1)]


def words(text: str) -> list[str]:
    """The words BM25 matches: jieba's words that hold a letter, digit or CJK character, lower-cased."""
    return [w.lower() for w in init_jieba().lcut(text) if _WORD.search(w)]


# --- the index -------------------------------------------------------------------------------

class Index:
    """Passages and their BM25 index; `built` says whether open_index built it (or read its cache)."""

    def __init__(self, passages: list[Passage], bm25, built: bool = True):
        self.passages, self.bm25, self.built = passages, bm25, built

    @classmethod
    def build(cls, passages: list[Passage]) -> Index:
        import bm25s  # only chat/serve --docs and the retrieval eval pay for the import

        if not passages:
            raise ValueError("no passages to index: the documents are empty")
        bm25 = bm25s.BM25()
        bm25.index([words(p.text) for p in passages], show_progress=False)
        return cls(passages, bm25)

    def search(self, query: str, k: int = TOP_K) -> list[Hit]:
        """The k best passages for the query, best first; only passages sharing a word with it."""
        known = [w for w in words(query) if w in self.bm25.vocab_dict]
        if not known or k < 1:
            return []
        ids, scores = self.bm25.retrieve([known], k=min(k, len(self.passages)), show_progress=False)
        return [Hit(self.passages[int(i)], float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

    def save(self, folder: Path) -> None:
        self.bm25.save(str(folder / "bm25"))
        table = pa.table({name: [getattr(p, name) for p in self.passages] for name in ("id", "doc", "text")})
        pq.write_table(table, folder / "passages.parquet", compression="zstd")

    @classmethod
    def load(cls, folder: Path) -> Index:
        import bm25s

        table = pq.read_table(folder / "passages.parquet").to_pylist()
        bm25 = bm25s.BM25.load(str(folder / "bm25"))
        return cls([Passage(**row) for row in table], bm25, built=False)


def fingerprint(path: str | os.PathLike, max_chars: int = PASSAGE_CHARS) -> str:
    """What the index is built from: every document file's relative name and content, the passage
    size and the index format."""
    path = Path(path)
    h = hashlib.sha256(json.dumps({"version": INDEX_VERSION, "passage_chars": max_chars}).encode())
    for f in document_files(path):
        name = f.name if path.is_file() else f.relative_to(path).as_posix()
        h.update(f"{name}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def cache_folder(path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """Where the index of the documents at `path` is cached."""
    if cache_root is None:
        cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zhlm" / "retrieval"
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return Path(cache_root) / key


def open_index(path: str | os.PathLike, cache_root: str | os.PathLike | None = None,
               max_chars: int = PASSAGE_CHARS) -> Index:
    """The index of the documents at `path`: read from the cache if the documents are unchanged,
    else built and cached."""
    path = Path(path).resolve()
    folder = cache_folder(path, cache_root)
    wanted = fingerprint(path, max_chars)
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        try:
            if json.loads(meta_file.read_text())["fingerprint"] == wanted:
                return Index.load(folder)
        except (OSError, ValueError, KeyError, TypeError):  # a damaged cache is rebuilt
            log.warning("%s: unreadable index cache; rebuilding it", folder)
    start = time.time()
    passages = passages_of(read_documents(path), max_chars)
    if not passages:
        raise ValueError(f"{path}: no text to index (documents are .txt and .md files, or a parquet file)")
    index = Index.build(passages)
    log.info("indexed %d passages of %s in %.1fs", len(index.passages), path, time.time() - start)
    _save(index, folder, {"fingerprint": wanted, "documents": str(path), "passages": len(index.passages)})
    return index


def _save(index: Index, folder: Path, meta: dict) -> None:
    """Write the cache beside its place and swap it in; meta.json, which makes it valid, goes last."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        index.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:  # e.g. another process swapped its own in first: this index still serves
        log.warning("could not cache the index in %s: %s", folder, e)
        shutil.rmtree(tmp, ignore_errors=True)


# --- the prompt ------------------------------------------------------------------------------

def reference_text(hits: list[Hit], max_chars: int = REFERENCE_CHARS) -> tuple[str | None, list[Hit]]:
    """'参考资料：\\n[id] passage\\n…' of at most max_chars characters, best passage first, and the
    hits it holds. A passage that does not fit whole is cut (ending in …) if at least MIN_CUT_CHARS
    of it fit, else it and the rest are left out. None when no passage fits."""
    text, used = HEADER, []
    for hit in hits:
        line = f"\n[{hit.passage.id}] "
        room = max_chars - len(text) - len(line)
        if room >= len(hit.passage.text):
            text += line + hit.passage.text
        elif room - 1 >= MIN_CUT_CHARS:
            text += line + hit.passage.text[:room - 1] + "…"
        else:
            break
        used.append(hit)
    return (text, used) if used else (None, [])


def with_references(messages: list[dict], reference: str | None) -> list[dict]:
    """The conversation with the reference text added to its system message (one is added first
    if it has none)."""
    if not reference:
        return messages
    if messages and messages[0]["role"] == "system":
        system = {"role": "system", "content": f"{messages[0]['content']}\n\n{reference}"}
        return [system, *messages[1:]]
    return [{"role": "system", "content": reference}, *messages]


def query_of(messages: list[dict]) -> str | None:
    """What to search for: the last user message."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)


def fit_references(messages: list[dict], hits: list[Hit], fits: Callable[[list[dict]], bool],
                   max_chars: int = REFERENCE_CHARS) -> tuple[list[dict], list[Hit]]:
    """The conversation with as much of the hits as `fits` accepts within max_chars, and the hits
    used; the conversation unchanged and no hits if not even a cut passage fits."""
    while True:
        reference, used = reference_text(hits, max_chars)
        if reference is None:
            return messages, []
        augmented = with_references(messages, reference)
        if fits(augmented):
            return augmented, used
        max_chars = len(reference) - 1 - len(reference) // 8  # shrink by an eighth and retry


def augment(messages: list[dict], index: Index, tokenizer: Tokenizer, context: int, answer_tokens: int, *,
            top_k: int = TOP_K, max_chars: int = REFERENCE_CHARS) -> tuple[list[dict], list[Hit]]:
    """Search for the last user message and put the best passages into the system message, as
    many as leave `answer_tokens` of the `context` for the answer. Returns (messages, hits used)."""
    query = query_of(messages)
    hits = index.search(query, top_k) if query else []
    if not hits:
        return messages, []
    return fit_references(messages, hits, lambda m: len(encode_prompt(tokenizer, m)) + answer_tokens <= context,
                          max_chars)


def check_settings(top_k: int, max_chars: int) -> None:
    """At least one passage, and room in the budget for the header and one cut passage."""
    if top_k < 1:
        raise ValueError(f"--docs-top-k must be at least 1; got {top_k}")
    least = len(HEADER) + MIN_CUT_CHARS + 8  # 8: the "\n[id] " around a short id
    if max_chars < least:
        raise ValueError(f"--docs-chars must be at least {least}; got {max_chars}")


@dataclass
class Retriever:
    """An index and how much of it goes into a prompt: what chat and serve hold with --docs."""
    index: Index
    top_k: int = TOP_K
    max_chars: int = REFERENCE_CHARS

    def __post_init__(self):
        check_settings(self.top_k, self.max_chars)

    def augment(self, messages: list[dict], tokenizer: Tokenizer, context: int,
                answer_tokens: int) -> tuple[list[dict], list[Hit]]:
        return augment(messages, self.index, tokenizer, context, answer_tokens, top_k=self.top_k,
                       max_chars=self.max_chars)


def open_retriever(path: str | os.PathLike, top_k: int = TOP_K, max_chars: int = REFERENCE_CHARS,
                   cache_root: str | os.PathLike | None = None) -> Retriever:
    """`--docs PATH`: the settings checked first, then the (cached) index of the documents."""
    check_settings(top_k, max_chars)  # before indexing anything
    return Retriever(open_index(path, cache_root), top_k, max_chars)


def passage_ids(hits: list[Hit]) -> list[dict]:
    """The hits as the API returns them: [{"id", "score"}]."""
    return [{"id": h.passage.id, "score": round(h.score, 4)} for h in hits]


def describe(hits: list[Hit]) -> str:
    """One line for the terminal: the passages in the prompt and their scores."""
    if not hits:
        return "(passages: none in the prompt)"
    return "(passages: " + ", ".join(f"{h.passage.id} {h.score:.2f}" for h in hits) + ")"

