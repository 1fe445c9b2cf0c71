"""Preference accuracy: does the model give the chosen answer more probability than the rejected one?

Both answers are scored as the assistant's reply to the prompt, exactly as DPO
trains on them (ChatML, labels on the answer and its <|im_end|>), with summed
log-probabilities and no reference model, so SFT and DPO models compare directly.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer

from zhlm.tokenizer.chat import EOT, IGNORE, encode_chats
from zhlm.train.dpo import sequence_logp
from zhlm.train.sft import pad_batch


@torch.no_grad()
def sequence_scores(model, examples: list[tuple[list[int], list[int]]], pad_id: int,
                    batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed log-prob of the labelled tokens, their count) of each (ids, labels) example.

    Examples are batched by length to waste little on padding; right padding
    does not change the log-probs of the tokens before it.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        padded = pad_batch([examples[i] for i in batch], pad_id)
        logp = sequence_logp(model, padded["input_ids"].to(device), padded["labels"].to(device))
        counts = (padded["labels"] != IGNORE).sum(-1)
        for i, lp, n in zip(batch, logp.tolist(), counts.tolist()):
            out[i] = (lp, n)
    model.train(was_training)
    return out


def preference_accuracy(model, tokenizer: Tokenizer, pairs: list[dict], *, batch_size: int = 8) -> dict:
    """Share of pairs whose chosen answer has the higher summed log-prob, and the mean margin."""
    if not pairs:
        return {"n": 0}
    examples = encode_chats(tokenizer, [
        [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": answer}]
        for pair in pairs for answer in (pair["chosen"], pair["rejected"])])
    scores = [lp for lp, _ in sequence_scores(model, examples, tokenizer.token_to_id(EOT), batch_size)]
    chosen, rejected = scores[0::2], scores[1::2]
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(pairs)
    return {"n": n,
            "accuracy": sum(m > 0 for m in margins) / n,  # a tie is not a win
            "mean_margin": sum(margins) / n,
            "mean_logp_chosen": sum(chosen) / n,
            "mean_logp_rejected": sum(rejected) / n}
