"""The unified row schemas shared by every data stage, and the rejects format.

Every data stage keeps rows in = rows kept + rows rejected (+ rows removed as
duplicates); a rejected row is kept in a rejects table with its reason.
"""
from __future__ import annotations

import pyarrow as pa

# Text fields of each source kind, besides `id` and `source`.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("text",),
    "sft": ("prompt", "response"),
    "dpo": ("prompt", "chosen", "rejected"),
    # C-Eval / CMMLU-format multiple choice, for eval only: never split or trained on.
    "choice": ("question", "A", "B", "C", "D", "answer"),
}
# Optional fields an sft row may carry: a system prompt, and earlier turns as
# alternating user/assistant messages, JSON-encoded (a list of {"role", "content"}).
SFT_OPTIONAL = ("system", "history")
# Every field a source may give a template for (each kind's fields, sft's optional ones after its own).
TEMPLATE_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(
    field for kind, fields in KIND_FIELDS.items() for field in (*fields, *(SFT_OPTIONAL if kind == "sft" else ()))))


def row_schema(kind: str) -> pa.Schema:
    fields = [("id", pa.string()), ("source", pa.string())]
    fields += [(name, pa.string()) for name in KIND_FIELDS[kind]]
    if kind == "sft":
        fields += [(name, pa.string()) for name in SFT_OPTIONAL]
    return pa.schema(fields)


def rows_table(rows: list[dict], kind: str) -> pa.Table:
    schema = row_schema(kind)
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


# Rejected rows: where they came from, why, and their content as far as it was read.
REJECT_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("index", pa.int64()),     # line / record number in the source (0-based)
    ("id", pa.string()),       # null when no id could be read
    ("reason", pa.string()),
    ("content", pa.string()),  # the raw or parsed content, for inspection
])


def rejects_table(rejects: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in REJECT_SCHEMA.names} for r in rejects],
                                schema=REJECT_SCHEMA)


def text_of(row: dict, kind: str) -> str:
    """The text of a row that cleaning filters and dedup compare: its fields joined."""
    return "\n".join(row.get(f) or "" for f in KIND_FIELDS[kind])


def merge_stats(parts: list[dict]) -> dict:
    """Add up the stats of shards: numbers are summed (recursively), other values taken from the first."""
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                merged[key] = merge_stats([merged.get(key, {}), value])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            else:
                merged.setdefault(key, value)
    return merged
