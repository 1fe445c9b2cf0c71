"""Preference accuracy: does the model give the chosen answer more probability than the rejected one?

Both answers are scored as the assistant's reply to the prompt, exactly as DPO
trains on them (ChatML, labels on the answer and its <|im_end|>), with summed
log-probabilities and no reference model, so SFT and DPO models compare directly.
"""
from __future__ import annotations

from tokenizers import Tokenizer

from zhlm.lm import sequence_scores
from zhlm.tokenizer.chat import EOT, encode_chats


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
