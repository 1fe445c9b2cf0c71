"""Held-out preference pairs, scored as DPO scores them.

Each answer is the assistant's reply in the pair's conversation (messages_of: system,
earlier turns, prompt), encoded as zhlm.tokenizer.conversations.tokenize_dpo encodes it
(labels on the answer and its <|im_end|>; a pair with an answer that carries no label is
left out), optionally cut to DPO's window, and its summed log-probability taken.

Two scores from these log-probabilities:

- preference accuracy: the model gives the chosen answer the higher log-probability. It
  needs no reference model, so SFT and DPO models compare directly.
- implicit-reward accuracy: DPO's own reward margin
  β·[(log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))]
  is positive, with the SFT model as the reference (zhlm.train.dpo.dpo_losses computes it).
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer

from zhlm.lm import IGNORE, sequence_scores
from zhlm.tokenizer.chat import EOT, encode_chats, messages_of
from zhlm.train.dpo import dpo_losses

SIDES = ("chosen", "rejected")


def encode_pairs(tokenizer: Tokenizer, pairs: list[dict], max_len: int | None = None) -> list[tuple]:
    """(chosen (ids, labels), rejected (ids, labels)) of each pair that tokenize_dpo keeps.

    max_len: each conversation cut to its first max_len tokens, as DPO reads it
    (zhlm.train.dpo.open_pairs; an answer cut off entirely then scores 0, as in training).
    """
    encoded = {side: encode_chats(tokenizer, [messages_of({**pair, "response": pair[side]}) for pair in pairs])
               for side in SIDES}
    out = []
    for chosen, rejected in zip(encoded["chosen"], encoded["rejected"]):
        # The first token is never predicted: an answer needs a label after it (as in tokenize_dpo).
        if all(any(label != IGNORE for label in labels[1:]) for _, labels in (chosen, rejected)):
            out.append(tuple((ids[:max_len], labels[:max_len]) for ids, labels in (chosen, rejected)))
    return out


def pair_logps(model, tokenizer: Tokenizer, encoded: list[tuple], *, batch_size: int = 8) -> torch.Tensor:
    """Summed log-probabilities (n, 2) of the chosen and rejected answers of encoded pairs, float64."""
    examples = [side for pair in encoded for side in pair]
    scores = sequence_scores(model, examples, tokenizer.token_to_id(EOT), batch_size)
    return torch.tensor([lp for lp, _ in scores], dtype=torch.float64).view(-1, 2)


def preference_summary(logps: torch.Tensor) -> dict:
    """Preference accuracy and mean margin (nats) from the (n, 2) log-probabilities of one model."""
    if not len(logps):
        return {"n": 0}
    chosen, rejected = logps[:, 0], logps[:, 1]
    margins = chosen - rejected
    return {"n": len(logps),
            "accuracy": (margins > 0).double().mean().item(),  # a tie is not a win
            "mean_margin": margins.mean().item(),
            "mean_logp_chosen": chosen.mean().item(),
            "mean_logp_rejected": rejected.mean().item()}


def implicit_reward_summary(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    """DPO's implicit-reward accuracy and mean margin from the (n, 2) log-probabilities of the
    policy and the reference, through DPO's own loss terms. A tie (margin 0, as when the policy
    is the reference) is not a win, as in DPO's reward_accuracy."""
    if not len(policy):
        return {"n": 0, "beta": beta}
    _, margins = dpo_losses(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta)
    return {"n": len(policy), "beta": beta,
            "accuracy": (margins > 0).double().mean().item(),
            "mean_margin": margins.mean().item()}


def preference_accuracy(model, tokenizer: Tokenizer, pairs: list[dict], *, batch_size: int = 8,
                        max_len: int | None = None) -> dict:
    """Share of pairs whose chosen answer has the higher summed log-prob, and the mean margin."""
    encoded = encode_pairs(tokenizer, pairs, max_len)
    return preference_summary(pair_logps(model, tokenizer, encoded, batch_size=batch_size))


def implicit_reward_accuracy(policy, reference, tokenizer: Tokenizer, pairs: list[dict], *, beta: float,
                             batch_size: int = 8, max_len: int | None = None) -> dict:
    """Share of pairs with a positive DPO reward margin of `policy` against `reference`, and the mean margin."""
    encoded = encode_pairs(tokenizer, pairs, max_len)
    return implicit_reward_summary(pair_logps(policy, tokenizer, encoded, batch_size=batch_size),
                                   pair_logps(reference, tokenizer, encoded, batch_size=batch_size), beta)
