"""C-Eval / CMMLU-format multiple choice, scored by answer log-probability.

Two ways, both with the options as the assistant's answer (ChatML):

- letter: the question and its four options are shown; each letter A-D is
  scored as the answer. This needs a model that learned the format.
- cloze: only the question is shown; each option's text is scored by its mean
  log-prob per token (so long options are not penalised for their length).
  This works without the format, so small models show signal sooner.

Only the answer's own tokens are scored, not its closing <|im_end|>.
"""
from __future__ import annotations

import csv
import os

import torch
from tokenizers import Tokenizer

from zhlm.lm import IGNORE, sequence_scores
from zhlm.tokenizer.chat import EOT, IM_END, encode_chats, encode_prompt

LETTERS = ("A", "B", "C", "D")
LETTER_INSTRUCTION = "请直接回答正确选项的字母。"


def letter_prompt(row: dict) -> str:
    options = "\n".join(f"{x}. {row[x]}" for x in LETTERS)
    return f"{row['question']}\n{options}\n{LETTER_INSTRUCTION}"


def read_choice_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a C-Eval-layout CSV (id, question, A, B, C, D, answer; extra columns kept)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f)]


def answer_logps(model, tokenizer: Tokenizer, items: list[tuple[str, str]], *,
                 batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of each answer as the assistant's reply to its user prompt."""
    examples = encode_chats(tokenizer, [[{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": answer}]
                                        for prompt, answer in items])
    im_end = tokenizer.token_to_id(IM_END)
    for _, labels in examples:
        # Score the answer itself: drop the closing <|im_end|> from the labels.
        last = max(i for i, t in enumerate(labels) if t != IGNORE)
        if labels[last] == im_end:
            labels[last] = IGNORE
    return sequence_scores(model, examples, tokenizer.token_to_id(EOT), batch_size)


@torch.no_grad()
def _last_logprobs(model, prompts: list[list[int]], pad_id: int, batch_size: int) -> list[torch.Tensor]:
    """Next-token log-probs (V,) after each prompt (right-padded batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        ids = torch.full((len(batch), max(map(len, batch))), pad_id, dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, :len(p)] = torch.tensor(p)
        logits = model(ids.to(device)).float()
        last = torch.tensor([len(p) - 1 for p in batch], device=device)
        out += list(torch.log_softmax(logits[torch.arange(len(batch), device=device), last], -1).cpu())
    model.train(was_training)
    return out


def letter_logps(model, tokenizer: Tokenizer, rows: list[dict], *, batch_size: int = 8) -> list[list[float]]:
    """Log-prob of each letter A-D as the assistant's answer to the letter prompt of each row.

    When every letter is one token right after the opened assistant turn (the
    usual case), one forward pass of the prompt scores all four; otherwise each
    letter is scored as a whole answer.
    """
    prompts = [letter_prompt(r) for r in rows]
    heads = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    full = encode_chats(tokenizer, [[{"role": "user", "content": p}, {"role": "assistant", "content": x}]
                                    for p in prompts for x in LETTERS])
    im_end = tokenizer.token_to_id(IM_END)
    pairs = [(heads[k // 4], ids) for k, (ids, _) in enumerate(full)]
    if not all(ids[:len(head)] == head and ids[len(head) + 1] == im_end for head, ids in pairs):
        scores = answer_logps(model, tokenizer, [(p, x) for p in prompts for x in LETTERS], batch_size=batch_size)
        return [[lp for lp, _ in scores[4 * k:4 * k + 4]] for k in range(len(rows))]
    letter_ids = [ids[len(head)] for head, ids in pairs]
    logps = _last_logprobs(model, heads, tokenizer.token_to_id(EOT), batch_size)
    return [[logps[k][letter_ids[4 * k + j]].item() for j in range(4)] for k in range(len(rows))]


def _argmax(scores: list[float]) -> str:
    return LETTERS[max(range(len(scores)), key=scores.__getitem__)]


def choice_scores(model, tokenizer: Tokenizer, rows: list[dict], *, batch_size: int = 8
                  ) -> list[dict]:
    """Per row: the letter and cloze scores of each option and the picked letters."""
    letter = letter_logps(model, tokenizer, rows, batch_size=batch_size)
    cloze_items = [(r["question"], str(r[x])) for r in rows for x in LETTERS]
    cloze = answer_logps(model, tokenizer, cloze_items, batch_size=batch_size)
    out = []
    for k, row in enumerate(rows):
        letter_scores = letter[k]
        # An option with no tokens has no probability to compare: it never wins.
        cloze_scores = [lp / n if n else float("-inf") for lp, n in cloze[4 * k:4 * k + 4]]
        out.append({"id": row.get("id"), "answer": str(row["answer"]).strip().upper(),
                    "letter_scores": letter_scores, "cloze_scores": cloze_scores,
                    "letter_pick": _argmax(letter_scores), "cloze_pick": _argmax(cloze_scores)})
    return out


def choice_accuracy(model, tokenizer: Tokenizer, rows: list[dict], *, batch_size: int = 8) -> dict:
    """Accuracy of the letter and cloze scorings over C-Eval-format rows; chance is 0.25."""
    if not rows:
        return {"n": 0, "chance": 0.25}
    scored = choice_scores(model, tokenizer, rows, batch_size=batch_size)
    n = len(scored)
    return {"n": n,
            "letter_accuracy": sum(s["letter_pick"] == s["answer"] for s in scored) / n,
            "cloze_accuracy": sum(s["cloze_pick"] == s["answer"] for s in scored) / n,
            "chance": 0.25}
