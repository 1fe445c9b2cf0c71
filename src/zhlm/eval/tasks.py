"""Held-out task metrics: the model answers held-out SFT prompts greedily, answers are scored.

The task of a row is the suffix of its id (`idiom:X#pinyin`, `news:12#seg3`, `news:12#ner0`, …).
"""
from __future__ import annotations

import collections
import re

from tokenizers import Tokenizer

from zhlm.data.split import split_point
from zhlm.eval.metrics import (
    char_f1,
    entity_counts,
    entity_scores,
    exact_match,
    jieba_entities,
    looping_share,
    parse_entities,
    polarity_label,
    prf,
    segmentation_counts,
)
from zhlm.generate import Sampling, generate
from zhlm.tokenizer.chat import chat_stop_ids, encode_prompt, messages_of

TASKS = ("pinyin", "polarity", "segmentation", "entities", "meaning", "origin", "example", "other")
_NUMBERED = {"segmentation": re.compile(r"seg\d+"), "entities": re.compile(r"ner\d+")}  # one per sentence of an item


def task_of(row_id: str) -> str:
    """The task a held-out row belongs to, from the suffix of its id."""
    _, _, suffix = row_id.partition("#")
    for task, pattern in _NUMBERED.items():
        if pattern.fullmatch(suffix):
            return task
    return suffix if suffix in TASKS else "other"


def select_rows(rows: list[dict], per_task_limit: int | None = None) -> dict[str, list[dict]]:
    """Rows grouped by task, each group cut to the limit: a sample in the order of the split's hash
    of each item (split_point; then by id), so every task is scored on items drawn uniformly from
    the held-out band, and an item's tasks (an idiom's pinyin, meaning, ...) on the same items.
    (The first by id would be the idioms whose first character has the lowest code point.)"""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[task_of(row["id"])].append(row)
    return {task: sorted(group, key=lambda r: (split_point(r["id"]), r["id"]))[:per_task_limit]
            for task, group in sorted(groups.items())}


def answer_prompts(model, tokenizer: Tokenizer, conversations: list[list[dict]], *,
                   max_new_tokens: int = 64, batch_size: int = 16) -> list[str | None]:
    """Greedy answers to conversations that end with a user turn.

    A prompt that leaves no room for an answer in the model's context is not
    answered (None). Prompts are batched by length to waste little on padding;
    greedy answers do not depend on the batch (see zhlm.generate).
    """
    stop_ids = tuple(chat_stop_ids(tokenizer))
    context = model.config.max_position_embeddings
    prompts = [encode_prompt(tokenizer, messages) for messages in conversations]
    answers: list[str | None] = [None] * len(prompts)
    order = sorted((i for i, p in enumerate(prompts) if len(p) < context), key=lambda i: len(prompts[i]))
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        outputs = generate(model, [prompts[i] for i in batch], sampling, stop_ids=stop_ids)
        for i, ids in zip(batch, outputs):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True)
    model.train(was_training)
    return answers


def _question(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "response"}


def score_task(task: str, items: list[dict]) -> dict:
    """Metrics of one task from its answered items (each with answer and reference), and the
    share of answers that loop (zhlm.eval.metrics.loop_unit)."""
    out: dict = {"n": len(items)}
    if not items:
        return out
    preds, refs = [it["answer"] for it in items], [it["reference"] for it in items]
    out["looping"] = looping_share(preds)
    if task == "pinyin":
        out["exact_match"] = sum(map(exact_match, preds, refs)) / len(items)
    elif task == "polarity":
        labels = [polarity_label(p) for p in preds]
        out["accuracy"] = sum(label == ref.strip() for label, ref in zip(labels, refs)) / len(items)
        out["no_label"] = sum(label is None for label in labels) / len(items)
    elif task == "segmentation":
        # Micro average: words of all sentences pooled.
        counts = [segmentation_counts(p, r) for p, r in zip(preds, refs)]
        precision, recall, f1 = prf(*(sum(c[k] for c in counts) for k in range(3)))
        out.update(precision=precision, recall=recall, f1=f1,
                   exact_match=sum(map(exact_match, preds, refs)) / len(items))
    elif task == "entities":
        parsed = [parse_entities(p) for p in preds]
        out.update(score_entities(parsed, refs))
        out["unparsed"] = sum(p is None for p in parsed) / len(items)
    else:  # meaning, origin, example, other: free text
        out["char_f1"] = sum(map(char_f1, preds, refs)) / len(items)
        out["exact_match"] = sum(map(exact_match, preds, refs)) / len(items)
    return out


def answer_budget(task: str, max_new_tokens: int) -> int:
    """Tokens an answer may take: a segmentation answer repeats its whole input sentence with
    spaces, so it gets twice the budget."""
    return 2 * max_new_tokens if task == "segmentation" else max_new_tokens
def score_entities(predicted: list[dict | None], references: list[str]) -> dict:
    """Entity precision, recall and F1, micro over all types (`precision`, `recall`, `f1`) and
    per type (`by_type`), of predicted entities (parse_entities' dicts) against the reference
    answers (zhlm.data.demo.format_entities' format)."""
    counts = [entity_counts(p, parse_entities(r) or {}) for p, r in zip(predicted, references)]
    scores = entity_scores(counts)
    micro = scores.pop("micro")
    return {"precision": micro["precision"], "recall": micro["recall"], "f1": micro["f1"],
            "entities": {k: micro[k] for k in ("correct", "predicted", "gold")}, "by_type": scores}


def entity_sentence(prompt: str) -> str:
    """The sentence of an entity prompt: what follows its instruction's line."""
    return prompt.split("\n", 1)[-1]


def jieba_baseline(rows: list[dict], per_task_limit: int | None = None) -> dict:
    """The entity scores of jieba's part-of-speech tagger (zhlm.eval.metrics.jieba_entities) on
    the held-out entity rows a model is scored on (select_rows with the same limit)."""
    rows = select_rows(rows, per_task_limit).get("entities", [])
    out = {"n": len(rows)}
    if rows:
        out.update(score_entities([jieba_entities(entity_sentence(r["prompt"])) for r in rows],
                                  [r["response"] for r in rows]))
    return out


def _item_score(task: str, pred: str, ref: str) -> float:
    """The headline score of one answer, kept with it for reading answers."""
    if task == "entities":  # a sentence with no entity, answered with none, is right
        scores = score_entities([parse_entities(pred)], [ref])
        return 1.0 if scores["entities"]["predicted"] == scores["entities"]["gold"] == 0 else scores["f1"]
    if task == "pinyin":
        return exact_match(pred, ref)
    if task == "polarity":
        return float(polarity_label(pred) == ref.strip())
    if task == "segmentation":
        return prf(*segmentation_counts(pred, ref))[2]
    return char_f1(pred, ref)


def evaluate_tasks(model, tokenizer: Tokenizer, rows: list[dict], *, max_new_tokens: int = 64,
                   batch_size: int = 16, per_task_limit: int | None = None) -> tuple[dict, list[dict]]:
    """Answer held-out sft rows greedily and score them per task.

    Returns (metrics by task, answers); each task's answers get answer_budget tokens. A row
    whose prompt does not fit the context is counted in `skipped`, not scored.
    """
    metrics, answers = {}, []
    for task, group in select_rows(rows, per_task_limit).items():
        preds = answer_prompts(model, tokenizer, [messages_of(_question(r)) for r in group],
                               max_new_tokens=answer_budget(task, max_new_tokens), batch_size=batch_size)
        items = []
        for row, pred in zip(group, preds):
            if pred is None:
                continue
            items.append({"id": row["id"], "task": task, "prompt": row["prompt"],
                          "reference": row["response"], "answer": pred,
                          "score": _item_score(task, pred, row["response"])})
        metrics[task] = score_task(task, items)
        metrics[task]["skipped"] = len(group) - len(items)
        answers += items
    return metrics, answers
