"""Text cleaning and row filters for every source kind.

`clean_text` applies, in order:

1. Unicode NFKC: full-width letters and digits become ASCII, compatibility
   forms fold into their plain characters.
2. Line breaks unified (\\r\\n, \\r, form feed, U+2028/2029 → \\n), then zero-width
   characters (U+200B–U+200D, U+2060, U+FEFF, soft hyphen) and every other control
   or format character (Unicode Cc/Cf, and stray surrogates) removed; \\n and \\t stay.
3. OpenCC traditional → simplified (`t2s.json`, one converter per process).
4. Whitespace: tabs, unicode spaces (U+3000, no-break space, …) and runs of
   spaces become one space; each line is stripped; 3+ newlines become 2; the
   ends are stripped. Spaces between CJK characters are kept (word-segmented
   text, such as the segmentation task's answers, depends on them).
5. Punctuation policy. NFKC turns the Chinese full-width marks ，！？：；（）～
   into ASCII and … into "...", so they are restored where the text is Chinese:

   - A cluster of the marks , ! ? : ; ( ) ~ and runs of 2+ "." (single spaces
     allowed inside) whose nearest non-space neighbour on either side is a CJK
     character (Han, kana, or a CJK symbol such as 。、《》) is rewritten: the spaces
     around and inside it go, runs of the same mark collapse to one ("!!!!" → "！"),
     each mark becomes its full-width form, and each run of dots becomes "……".
   - A (…) pair on one line with one side converted gets the other side converted too.
   - Runs of 。 or 、 collapse to one mark ("。。。。" → "。").
   - "……" and "——" are single Chinese marks and stay as they are. A lone "." is
     never touched. Text with no CJK neighbour is left alone, so English keeps
     its punctuation ("Hello, world!", "This class is good.", "Wait...").
   - Hangul is not CJK context here: Korean is written with ASCII punctuation.

`clean_text` is idempotent: NFKC undoes every full-width mark it wrote, and the
same rules then restore them.
"""
from __future__ import annotations

import functools
import json
import re
import unicodedata

import pyarrow as pa

from zhlm.data.schema import KIND_FIELDS, rejects_table, text_of

# --- character classes ------------------------------------------------------


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def char_remover(categories: tuple[str, ...], keep: str = "", extra: str = ""):
    """A function that deletes every character of the given Unicode categories
    (and the class body `extra`) from a string, except those in `keep`.

    Built from `unicodedata`, so it follows Python's Unicode version. A regex
    class of BMP characters compiles to a bitmap; one with characters beyond
    the BMP is checked range by range, several times slower, so that one is only
    used on the rare text that has such characters.
    """
    bmp, astral = [], []
    for lo, hi in ((0, 0x40000), (0xE0000, 0xF0000)):   # planes 4-13, 15, 16 hold none
        for cp in range(lo, hi):
            ch = chr(cp)
            if unicodedata.category(ch) in categories and ch not in keep:
                (bmp if cp < 0x10000 else astral).append(re.escape(ch))
    fast = re.compile(f"[{extra}{''.join(bmp)}]+")
    full = re.compile(f"[{extra}{''.join(bmp)}{''.join(astral)}]+")

    def remove(s: str) -> str:
        return (full if _ASTRAL.search(s) else fast).sub("", s)
    return remove


# Han ideographs: CJK unified (+ extension A), compatibility, and the supplementary
# ideographic planes (extensions B and later).
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
# What counts as Chinese context for the punctuation rules: Han, CJK symbols and
# punctuation (。、《》「」…), kana.
_CJK_CONTEXT = HAN + "\u3000-\u303f\u3040-\u30ff"

_NEWLINES = re.compile(r"\r\n|[\r\x0b\x0c\x85\u2028\u2029]")
# Cc and Cf (zero-width space/joiners, word joiner, BOM, soft hyphen, bidi marks…)
# except \t and \n, plus lone surrogates, which cannot be encoded as UTF-8.
_remove_invisible = char_remover(("Cc", "Cf"), keep="\t\n", extra="\ud800-\udfff")
_HSPACE = re.compile(r"[^\S\n]+")           # any whitespace but newline, runs included
_LINE_EDGE = re.compile(r" *\n *")
_MANY_NEWLINES = re.compile(r"\n{3,}")

_MARK = r"(?:[,!?:;()~]|\.{2,})"
# A cluster of marks with the single spaces around and inside it. Whitespace is
# normalised first, so the characters just outside a match are its nearest
# non-space neighbours (or a line break): the callback only has to look at those two.
_PUNCT_CLUSTER = re.compile(rf" ?({_MARK}(?: ?{_MARK})*) ?")
_CJK_CHAR = re.compile(f"[{_CJK_CONTEXT}]")
_HALF_PAREN_PAIR = re.compile(r"（[^()（）\n]*\)|\([^()（）\n]*）")
_REPEATED_MARK = re.compile(r"([,!?:;~])\1+")
_DOTS = re.compile(r"\.{2,}")
_CJK_REPEATS = re.compile(r"([。、])\1+")
_FULL_WIDTH = str.maketrans(",!?:;()~", "，！？：；（）～")

_HAN_RUN = re.compile(f"[{HAN}]+")
_WHITESPACE_RUN = re.compile(r"\s+")


@functools.lru_cache(maxsize=4096)
def _full_width(cluster: str) -> str:
    cluster = _REPEATED_MARK.sub(r"\1", cluster.replace(" ", ""))
    return _DOTS.sub("……", cluster).translate(_FULL_WIDTH)


def _cjk_punct(m: re.Match) -> str:
    s, start, end = m.string, m.start(), m.end()
    if (start and _CJK_CHAR.match(s, start - 1)) or _CJK_CHAR.match(s, end):
        return _full_width(m.group(1))
    return m.group(0)


def _pair_paren(m: re.Match) -> str:
    return "（" + m.group(0)[1:-1] + "）"


_converter = None


def _t2s(s: str) -> str:
    global _converter
    if _converter is None:  # one converter per process, created on first use
        import opencc
        _converter = opencc.OpenCC("t2s.json")
    return _converter.convert(s)


def clean_text(s: str) -> str:
    """Normalise one text (see the module docstring for the steps and the punctuation policy)."""
    s = unicodedata.normalize("NFKC", s)
    s = _NEWLINES.sub("\n", s)
    s = _remove_invisible(s)
    if not s.isascii():
        s = _t2s(s)
    s = _HSPACE.sub(" ", s)
    s = _LINE_EDGE.sub("\n", s)
    s = _MANY_NEWLINES.sub("\n\n", s).strip()
    if not s.isascii():  # the punctuation rules only act next to CJK characters
        s = _PUNCT_CLUSTER.sub(_cjk_punct, s)
        s = _HALF_PAREN_PAIR.sub(_pair_paren, s)
        s = _CJK_REPEATS.sub(r"\1", s)
    return s


def cjk_ratio(s: str) -> float:
    """Share of Han ideographs among the non-whitespace characters of `s` (0 for empty)."""
    # Summing the lengths of runs makes far fewer objects than one per character.
    visible = len(s) - sum(map(len, _WHITESPACE_RUN.findall(s)))
    return sum(map(len, _HAN_RUN.findall(s))) / visible if visible else 0.0


# --- tables -----------------------------------------------------------------


def _clean_history(history: str | None) -> str | None:
    """Clean the `content` of each turn of a JSON-encoded sft history.

    A history that is not a JSON list of objects is passed through unchanged:
    parsing validated it, and cleaning must not lose it.
    """
    if not history:
        return history
    try:
        turns = json.loads(history)
    except ValueError:
        return history
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return history
    for turn in turns:
        if isinstance(turn.get("content"), str):
            turn["content"] = clean_text(turn["content"])
    return json.dumps(turns, ensure_ascii=False)


def clean_table(table: pa.Table, kind: str, *, min_chars: int = 1, max_chars: int = 100_000,
                min_cjk_ratio: float = 0.0, index_offset: int = 0) -> tuple[pa.Table, pa.Table, dict]:
    """Clean every text field of `kind`, then filter rows on their joined text (`text_of`).

    Returns (kept rows with cleaned fields, rejects, stats). A row is rejected with
    the first reason that applies: "empty after cleaning" (a required field is empty),
    "too short" (< min_chars characters), "too long" (> max_chars), "low chinese ratio"
    (cjk_ratio < min_cjk_ratio). Reject `index` is the row's position in `table`
    plus `index_offset` (a shard's start, so it points into the whole source).
    stats: rows_in/rows_kept/rows_rejected, reasons, chars_in (all input rows) and
    chars_out (kept rows), both counted on `text_of`.
    """
    fields = KIND_FIELDS[kind]
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    n = table.num_rows
    chars_in = sum(len(text_of({f: columns[f][i] for f in fields}, kind)) for i in range(n))

    for name in fields + (("system",) if kind == "sft" and "system" in columns else ()):
        columns[name] = [clean_text(v) if v is not None else None for v in columns[name]]
    if kind == "sft" and "history" in columns:
        columns["history"] = [_clean_history(v) for v in columns["history"]]

    keep: list[int] = []
    rejects: list[dict] = []
    reasons: dict[str, int] = {}
    chars_out = 0
    for i in range(n):
        row = {f: columns[f][i] for f in fields}
        text = text_of(row, kind)
        if not all(row[f] for f in fields):
            reason = "empty after cleaning"
        elif len(text) < min_chars:
            reason = "too short"
        elif len(text) > max_chars:
            reason = "too long"
        elif min_cjk_ratio > 0 and cjk_ratio(text) < min_cjk_ratio:
            reason = "low chinese ratio"
        else:
            keep.append(i)
            chars_out += len(text)
            continue
        reasons[reason] = reasons.get(reason, 0) + 1
        rejects.append({
            "source": columns["source"][i] if "source" in columns else None,
            "index": index_offset + i,
            "id": columns["id"][i] if "id" in columns else None,
            "reason": reason,
            "content": text,
        })

    cleaned = pa.Table.from_pydict(columns, schema=table.schema)
    kept = cleaned.take(pa.array(keep, type=pa.int64()))
    stats = {
        "rows_in": n,
        "rows_kept": len(keep),
        "rows_rejected": len(rejects),
        "reasons": dict(sorted(reasons.items())),
        "chars_in": chars_in,
        "chars_out": chars_out,
    }
    return kept, rejects_table(rejects), stats
