"""DPO rollouts: the SFT model answers held-back prompts; its answer is `rejected`, the reference `chosen`.

The prompts are a sample of the DPO prompts, drawn by a hash of each prompt's id: every source
and task in its share, the same sample whatever the sharding or file order (taking the first by
id would take only the source whose name sorts first). Pairs whose two answers are nearly the
same (character similarity at or above `max_similarity`) teach nothing and are dropped, and
counted (so a rollout that answers a checkable task exactly right never becomes a rejected
answer). Each task's answers get the token budget the eval gives them. A share of the pairs,
chosen by a hash of their id, is kept for evaluation only.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from zhlm.eval.metrics import loop_unit
from zhlm.eval.tasks import answer_budget, task_of
from zhlm.generate import Sampling, generate
from zhlm.inference import load
from zhlm.io import as_paths
from zhlm.tokenizer.chat import chat_stop_ids, encode_prompt, messages_of


@dataclass
class RolloutConfig:
    """The schema's `rollouts` settings, with its defaults (a test holds the two together)."""
    max_prompts: int = 2000          # DPO prompts answered: a sample by a hash of their ids (sample_prompts)
    sources: list[str] = dataclasses.field(default_factory=list)  # the sft sources answered (none: all)
    batch_size: int = 32
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    max_similarity: float = 0.9      # pairs whose answers are at least this similar are dropped
    eval_fraction: float = 0.1       # share of pairs held out to score DPO
    seed: int = 0
    device: str = "auto"


def similarity(a: str, b: str) -> float:
    """Character-level similarity in [0, 1] (difflib's ratio: 2 × matches / total length)."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def prompt_rank(row_id: str) -> bytes:
    """The order prompts are sampled in: a hash of the id, so a sample of any size is uniform over
    sources and tasks, and a larger one contains a smaller one."""
    return hashlib.blake2b(f"prompt:{row_id}".encode(), digest_size=8).digest()


def sample_prompts(prompt_files, max_prompts: int, sources=()) -> list[dict]:
    """The max_prompts rows of prompt_files (parquet paths) lowest by prompt_rank, in id order,
    of the rows of `sources` (none: all).

    Only the ids of all the prompts are held at once; the rows are read one file at a time."""
    paths = as_paths(prompt_files)
    ids = [row["id"] for path in paths for row in pq.read_table(path, columns=["id", "source"]).to_pylist()
           if not sources or row["source"] in sources]
    chosen = pa.array(sorted(ids, key=prompt_rank)[:max_prompts])
    rows = [row for path in paths for row in pq.read_table(path, filters=pc.field("id").isin(chosen)).to_pylist()]
    return sorted(rows, key=lambda row: row["id"])


def is_eval_pair(row_id: str, eval_fraction: float) -> bool:
    digest = hashlib.blake2b(f"pair:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def rollout(model, tokenizer, rows: list[dict], sampling: Sampling, *, batch_size: int = 16, seed: int = 0,
            max_similarity: float = 0.9, eval_fraction: float = 0.1, progress: bool = True
            ) -> tuple[pa.Table, dict]:
    """Generate an answer for every row and return (pairs, stats)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    stop = chat_stop_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, messages_of({**row, "response": None})) for row in rows]
    # A prompt that fills the context leaves no room for an answer: skipped, and counted.
    context = model.config.max_position_embeddings
    fits = [i for i, p in enumerate(prompts) if len(p) < context]
    too_long = len(prompts) - len(fits)
    rows, prompts = [rows[i] for i in fits], [prompts[i] for i in fits]
    tasks = [task_of(row["id"]) for row in rows]
    # Batches of one answer budget and similar prompt length waste less on padding.
    order = sorted(range(len(rows)), key=lambda i: (answer_budget(tasks[i], sampling.max_new_tokens),
                                                    len(prompts[i]), rows[i]["id"]))
    answers: dict[int, str] = {}
    for first in tqdm(range(0, len(order), batch_size), desc="rollouts", unit="batch", disable=not progress):
        batch = order[first:first + batch_size]
        budgets = {answer_budget(tasks[i], sampling.max_new_tokens) for i in batch}
        batch_sampling = dataclasses.replace(sampling, max_new_tokens=max(budgets))
        outputs = generate(model, [prompts[i] for i in batch], batch_sampling, stop_ids=stop, generator=generator)
        for i, ids in zip(batch, outputs):
            answers[i] = tokenizer.decode(ids[:answer_budget(tasks[i], sampling.max_new_tokens)])
    pairs, dropped = [], 0
    for i, row in enumerate(rows):
        if similarity(answers[i], row["response"]) >= max_similarity:
            dropped += 1
            continue
        pairs.append({"id": row["id"], "source": row["source"], "prompt": row["prompt"],
                      "system": row.get("system"), "history": row.get("history"),
                      "chosen": row["response"], "rejected": answers[i],
                      "split": "eval" if is_eval_pair(row["id"], eval_fraction) else "train",
                      "temperature": sampling.temperature, "top_p": sampling.top_p,
                      "max_new_tokens": sampling.max_new_tokens, "seed": seed})
    schema = pa.schema([(k, pa.string()) for k in ("id", "source", "prompt", "system", "history", "chosen",
                                                   "rejected", "split")]
                       + [("temperature", pa.float64()), ("top_p", pa.float64()),
                          ("max_new_tokens", pa.int64()), ("seed", pa.int64())])
    table = pa.Table.from_pylist(pairs, schema=schema)
    stats = {"prompts": len(rows) + too_long, "pairs": len(pairs), "dropped_similar": dropped,
             "skipped_too_long": too_long,
             "looping_rollouts": sum(loop_unit(a) is not None for a in answers.values()),
             "eval_pairs": sum(p["split"] == "eval" for p in pairs), "max_similarity": max_similarity,
             "mean_answer_chars": sum(map(len, answers.values())) / max(1, len(answers))}
    return table, stats


def run(model_dir, prompt_files, *, settings: dict, progress: bool = True) -> tuple[pa.Table, dict]:
    """Rollouts of the model in model_dir on a sample of max_prompts prompts of prompt_files
    (a parquet path or a list; sample_prompts); settings: RolloutConfig."""
    cfg = RolloutConfig(**settings)
    lm = load(model_dir, cfg.device)
    rows = sample_prompts(prompt_files, cfg.max_prompts, cfg.sources)
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    return rollout(lm.model, lm.tokenizer, rows, sampling, batch_size=cfg.batch_size, seed=cfg.seed,
                   max_similarity=cfg.max_similarity, eval_fraction=cfg.eval_fraction,
                   progress=progress)
