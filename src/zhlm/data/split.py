"""Split rows into train / held-out sets by a hash of their item key.

The item key is the id up to the first "#": a task derived from an item
(`idiom:X#pinyin`) lands in the same set as the item itself (`idiom:X`), across
every kind. The held-out band is the same for every kind, so an item held out
for eval is held out of every training set, pretraining text included.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

# Split names per kind. The first name is the training set; "val" and "eval"
# are the held-out band; "dpo_prompts" is the next band of sft items, kept out
# of SFT so the SFT model answers them fresh when DPO pairs are rolled out.
# "finetune" is the sft sources a finetune trains on: no DPO prompts among them.
SPLITS: dict[str, tuple[str, ...]] = {
    "pretrain": ("train", "val"),
    "sft": ("train", "dpo_prompts", "eval"),
    "dpo": ("train", "eval"),
    "finetune": ("train", "eval"),
}


def item_key(row_id: str) -> str:
    return row_id.split("#", 1)[0]


def split_point(row_id: str) -> float:
    """A uniform number in [0, 1) fixed by the item key."""
    digest = hashlib.blake2b(item_key(row_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign(row_id: str, kind: str, *, holdout: float, dpo_prompts: float = 0.0) -> str:
    u = split_point(row_id)
    if u < holdout:
        return "val" if kind == "pretrain" else "eval"
    if kind == "sft" and u < holdout + dpo_prompts:
        return "dpo_prompts"
    return "train"


def split_table(table: pa.Table, kind: str, *, holdout: float, dpo_prompts: float = 0.0
                ) -> tuple[dict[str, pa.Table], dict]:
    """Partition `table` into the kind's splits; stats count each split."""
    if not 0 <= holdout < 1 or not 0 <= dpo_prompts < 1 - holdout:
        raise ValueError(f"bad split fractions: holdout={holdout}, dpo_prompts={dpo_prompts}")
    names = pa.array([assign(i, kind, holdout=holdout, dpo_prompts=dpo_prompts)
                      for i in table.column("id").to_pylist()], pa.string())
    parts = {name: table.filter(pc.equal(names, name)) for name in SPLITS[kind]}
    stats = {"kind": kind, "rows_in": table.num_rows,
             "rows": {name: t.num_rows for name, t in parts.items()},
             "params": {"holdout": holdout, "dpo_prompts": dpo_prompts}}
    return parts, stats
