"""Evaluate one stage's model: everything that applies to it, as one JSON-able dict.

pretrain: bits per character only (a base model does not follow prompts).
sft, dpo: bits per character, held-out task metrics, preference accuracy,
multiple choice, sample answers to a fixed set of prompts, and the share of the
generated answers that loop; with a reference model (dpo: the SFT model), DPO's
implicit-reward accuracy on the held-out pairs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer

from zhlm.data.split import split_point
from zhlm.eval.bpc import evaluate_bpc, unigram_bpc
from zhlm.eval.choice import choice_accuracy
from zhlm.eval.metrics import looping_share
from zhlm.eval.preference import encode_pairs, implicit_reward_summary, pair_logps, preference_summary
from zhlm.eval.tasks import answer_prompts, evaluate_tasks, select_rows
from zhlm.inference import load
from zhlm.io import read_parquets
from zhlm.tokenizer.word_counts import iter_parquet_texts
from zhlm.train.loop import TrainConfig

SAMPLE_PROMPTS = (
    "你好，请介绍一下你自己。",
    "中国的首都是哪里？",
    "请用一句话解释什么是人工智能。",
    "写一首关于春天的短诗。",
    "“画蛇添足”是什么意思？",
    "推荐三本值得一读的书，并简单说明理由。",
)


@dataclass
class EvalConfig:
    """The schema's `eval` settings, with its defaults (a test holds the two together).
    A limit of None means everything."""
    max_task_items: int | None = 100     # held-out items scored per task
    max_bpc_chars: int | None = 200_000  # held-out characters scored for bits per character
    max_pairs: int | None = 200
    max_choice: int | None = 200         # per choice set
    max_new_tokens: int = 64
    sample_max_new_tokens: int = 128
    samples_per_task: int = 1
    batch_size: int = 16
    device: str = "auto"


def _first(rows: list[dict] | None, limit: int | None) -> list[dict]:
    """A deterministic subset: rows sorted by id, the first `limit` of them."""
    return sorted(rows or [], key=lambda r: r["id"])[:limit]


def _text_budget(texts: Iterable[str], max_chars: int | None) -> list[str]:
    """Whole texts, in an order fixed by a hash of each text, up to `max_chars` characters.

    Hash order mixes the sources, which sit in blocks in the files, and does not depend on
    how the files are sharded; it always keeps one text. Streamed: only the texts in the
    budget are held, whatever the size of the held-out split.
    """
    if max_chars is None:
        return [t for t in texts if t]
    # The texts so far with the smallest hashes, as a max-heap (hash bytes inverted), and
    # `cut`, the smallest hash dropped so far: no text at or after it is in the budget.
    heap: list[tuple[bytes, str]] = []
    chars, cut = 0, None
    for text in texts:
        if not text:
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        if cut is not None and digest >= cut:
            continue
        heapq.heappush(heap, (bytes(255 - b for b in digest), text))
        chars += len(text)
        while len(heap) > 1 and chars > max_chars:
            inverted, dropped = heapq.heappop(heap)
            chars -= len(dropped)
            cut = bytes(255 - b for b in inverted)
    return [text for _, text in sorted(heap, reverse=True)]


def sample_answers(model, tokenizer: Tokenizer, task_rows: list[dict] | None, *, per_task: int = 1,
                   max_new_tokens: int = 128, batch_size: int = 8) -> list[dict]:
    """Answers to the fixed prompts, and to the first `per_task` held-out rows of each task."""
    samples = [{"prompt": p, "task": None, "reference": None} for p in SAMPLE_PROMPTS]
    for task, rows in select_rows(task_rows or [], per_task).items():
        samples += [{"prompt": r["prompt"], "task": task, "reference": r["response"]} for r in rows]
    answers = answer_prompts(model, tokenizer, [[{"role": "user", "content": s["prompt"]}] for s in samples],
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{**s, "answer": a} for s, a in zip(samples, answers)]


def looping_summary(task_answers: list[dict], samples: list[dict]) -> dict:
    """The share of generated answers that loop (zhlm.eval.metrics.loop_unit), with their count:
    of the held-out task answers, of the sample answers, and of all of them together."""
    groups = {"tasks": [a["answer"] for a in task_answers],
              "samples": [s["answer"] for s in samples if s["answer"] is not None]}
    groups["all"] = groups["tasks"] + groups["samples"]
    return {name: {"n": len(answers), "share": looping_share(answers)} for name, answers in groups.items()}


def evaluate_model(model_dir: str | os.PathLike, *, stage: str, val_texts: Iterable[str],
                   train_texts_for_baseline: Iterable[str] | None = None, task_rows: list[dict] | None = None,
                   pairs: list[dict] | None = None, choice_sets: dict[str, list[dict]] | None = None,
                   seq_len: int, settings: dict | None = None, reference_dir: str | os.PathLike | None = None,
                   dpo_settings: dict | None = None) -> dict:
    """Run every evaluation that applies to `stage` on the model folder `model_dir`.

    settings: EvalConfig fields; those left out take its defaults. reference_dir: the model
    DPO started from, for the implicit reward. dpo_settings: the DPO stage's TrainConfig fields
    (its beta, and its seq_len, which cuts the pairs as DPO cut them).
    """
    s = EvalConfig(**(settings or {}))
    dpo = TrainConfig(**(dpo_settings or {}))
    lm = load(model_dir, s.device)
    model, tokenizer = lm.model, lm.tokenizer
    # Windows longer than the context would score positions the model never trained on.
    seq_len = min(seq_len, lm.context)
    bs = s.batch_size
    result: dict = {"stage": stage, "model_dir": str(model_dir),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "settings": dataclasses.asdict(s), "seq_len": seq_len, "seconds": {}}

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        result["seconds"][name] = round(time.perf_counter() - t0, 2)
        return value

    texts = _text_budget(val_texts, s.max_bpc_chars)
    result["bpc"] = timed("bpc", lambda: evaluate_bpc(model, tokenizer, texts, seq_len=seq_len, batch_size=bs))
    if train_texts_for_baseline is not None:
        result["unigram_bpc"] = timed("unigram", lambda: unigram_bpc(train_texts_for_baseline, texts))
    if stage == "pretrain":
        return result

    if task_rows:
        metrics, answers = timed("tasks", lambda: evaluate_tasks(
            model, tokenizer, task_rows, max_new_tokens=s.max_new_tokens, batch_size=bs,
            per_task_limit=s.max_task_items))
        result["tasks"], result["task_answers"] = metrics, answers
    if pairs:
        # DPO reads each conversation's first seq_len + 1 tokens (zhlm.train.dpo.run).
        encoded = encode_pairs(tokenizer, _first(pairs, s.max_pairs), dpo.seq_len + 1)
        logps = timed("preference", lambda: pair_logps(model, tokenizer, encoded, batch_size=bs))
        result["preference"] = preference_summary(logps)
        if reference_dir is not None:
            result["implicit_reward"] = timed("implicit_reward", lambda: implicit_reward_summary(
                logps, reference_logps(reference_dir, tokenizer, encoded, s), dpo.beta))
    for name, rows in (choice_sets or {}).items():
        subset = _first(rows, s.max_choice)
        result.setdefault("choice", {})[name] = timed(
            f"choice:{name}", lambda: choice_accuracy(model, tokenizer, subset, batch_size=bs))  # noqa: B023 (runs now)
    result["samples"] = timed("samples", lambda: sample_answers(
        model, tokenizer, task_rows, per_task=s.samples_per_task,
        max_new_tokens=s.sample_max_new_tokens, batch_size=bs))
    result["looping"] = looping_summary(result.get("task_answers", []), result["samples"])
    return result


def reference_logps(reference_dir, tokenizer: Tokenizer, encoded: list[tuple], s: EvalConfig):
    """The reference model's (n, 2) log-probabilities of the encoded pairs; it must share the tokenizer."""
    reference = load(reference_dir, s.device)
    if reference.tokenizer.to_str() != tokenizer.to_str():
        raise ValueError(f"{reference_dir} has another tokenizer than the model it is the reference of")
    return pair_logps(reference.model, tokenizer, encoded, batch_size=s.batch_size)


def read_rows(paths) -> list[dict] | None:
    """The rows of parquet files (a split's shards), or None for no files."""
    return read_parquets(paths).to_pylist() if paths else None


def choice_sets_of(choice_files: dict | None, holdout: float) -> dict[str, list[dict]]:
    """choice_files maps a set's name to (path, heldout_only): a set built from training data is
    scored on its held-out band only."""
    return {name: [r for r in read_rows([path]) if not heldout_only or split_point(r["id"]) < holdout]
            for name, (path, heldout_only) in (choice_files or {}).items()}


def evaluate_files(model_dir, *, stage: str, val_files, train_files=(), task_files=(),
                   pair_files=(), choice_files: dict | None = None, holdout: float = 0.0,
                   seq_len: int, settings: dict | None = None, reference_dir=None,
                   dpo_settings: dict | None = None) -> dict:
    """evaluate_model on the workflow's files (each a list of parquet files, a split's shards).

    Texts are streamed: the held-out text up to its budget, the training text once for the
    unigram baseline. Held-out pairs are the rows of split "eval" (or files without a split
    column); choice_files as choice_sets_of takes them.
    """
    pairs = [r for r in read_rows(pair_files) or [] if r.get("split", "eval") == "eval"]
    return evaluate_model(
        model_dir, stage=stage, val_texts=iter_parquet_texts(val_files, ["text"]),
        train_texts_for_baseline=iter_parquet_texts(train_files, ["text"]) if train_files else None,
        task_rows=read_rows(task_files), pairs=pairs, choice_sets=choice_sets_of(choice_files, holdout),
        seq_len=seq_len, settings=settings,
        reference_dir=reference_dir, dpo_settings=dpo_settings)
