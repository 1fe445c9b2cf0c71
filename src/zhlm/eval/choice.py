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

from tokenizers import Tokenizer

from zhlm.eval.preference import sequence_scores
from zhlm.tokenizer.chat import EOT, IGNORE, IM_END, encode_chats

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


def _argmax(scores: list[float]) -> str:
    return LETTERS[max(range(len(scores)), key=scores.__getitem__)]


def choice_scores(model, tokenizer: Tokenizer, rows: list[dict], *, batch_size: int = 8
                  ) -> list[dict]:
    """Per row: the letter and cloze scores of each option and the picked letters."""
    letter_items = [(letter_prompt(r), x) for r in rows for x in LETTERS]
    cloze_items = [(r["question"], str(r[x])) for r in rows for x in LETTERS]
    letter = answer_logps(model, tokenizer, letter_items, batch_size=batch_size)
    cloze = answer_logps(model, tokenizer, cloze_items, batch_size=batch_size)
    out = []
    for k, row in enumerate(rows):
        letter_scores = [lp for lp, _ in letter[4 * k:4 * k + 4]]
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
