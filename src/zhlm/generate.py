"""Batched sampling with a KV cache.

Prompts of different lengths are left-padded; each row gets its own positions
and a mask that hides its padding, so a prompt's answer does not depend on the
other prompts in its batch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from zhlm.model import KVCache, LlamaForCausalLM


@dataclass
class Sampling:
    """How to pick each new token. The ranges are the ones every caller (chat, serve, rollouts) may use."""
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 is greedy, and so is anything below MIN_TEMPERATURE
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name, lo, hi in (("temperature", 0, MAX_TEMPERATURE), ("top_p", 0, 1),
                             ("repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{name} must be a number from {lo} to {hi}, not {value!r}")
        if self.top_p == 0:
            raise ValueError("top_p must be above 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")


MAX_TEMPERATURE = 2.0
MIN_TEMPERATURE = 1e-3  # below it decode greedily (the limit as it goes to 0): logits / temperature would overflow
MIN_REPETITION_PENALTY = 0.01  # a lower one overflows the logits it divides, as above
MAX_REPETITION_PENALTY = 10.0


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from the last-position logits (B, V); `seen` (B, V) marks each row's tokens so far."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        # CTRL-style penalty on every token already in the row.
        penalized = torch.where(logits > 0, logits / sampling.repetition_penalty,
                                logits * sampling.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if sampling.temperature < MIN_TEMPERATURE:
        return logits.max(-1).indices  # argmax (the first maximum), in a third of argmax's time
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least one).
        drop = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def stream(model: LlamaForCausalLM, prompts: list[list[int]], sampling: Sampling, *, stop_ids=(),
           generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step, until all rows stopped.

    A row stops after one of `stop_ids` (which is yielded) or max_new_tokens;
    rows that stopped keep yielding -1.
    """
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    max_len = min(P + sampling.max_new_tokens, model.config.max_position_embeddings)
    if P >= max_len:
        raise ValueError(f"prompt of {P} tokens leaves no room in a context of {model.config.max_position_embeddings}")
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        valid[i, P - len(p):] = True
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, max_len, device, dtype)
    padded = not bool(valid[:, :P].all())
    if padded:
        positions = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        # A padding query sees itself only, so no row of the mask is empty (that gives NaN).
        mask = (causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
        logits = model(ids, positions=positions, mask=mask[:, None], cache=cache, last_only=True)[:, -1]
        # Decoding steps add the padding mask as a bias; the new positions are never padding.
        bias = torch.zeros(B, 1, 1, max_len, dtype=dtype, device=device)
        bias.masked_fill_(~valid[:, None, None], -torch.inf)
        last_pos = positions[:, -1]
    else:
        # No padding: plain causal attention and positions that follow the cache.
        logits = model(ids, cache=cache, last_only=True)[:, -1]
    stop = torch.tensor(list(stop_ids) or [-2], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    seen = None
    if sampling.repetition_penalty != 1.0:
        # The prompt's own tokens, not its left padding.
        counts = torch.zeros(B, model.config.vocab_size, dtype=torch.long, device=device)
        seen = counts.scatter_add_(1, ids, valid[:, :P].long()) > 0
    for step in range(max_len - P):
        token = next_tokens(logits, sampling, generator, seen)
        token = token.masked_fill(done, -1)
        yield token
        done |= torch.isin(token, stop)
        if done.all() or step == max_len - P - 1:
            return
        feed = token.clamp(min=0)[:, None]
        if seen is not None:
            seen.scatter_(1, feed, True)
        if padded:
            last_pos = last_pos + 1
            logits = model(feed, positions=last_pos[:, None], mask=bias[..., :P + step + 1], cache=cache)[:, -1]
        else:
            logits = model(feed, cache=cache)[:, -1]


def generate(model: LlamaForCausalLM, prompts: list[list[int]], sampling: Sampling, *, stop_ids=(),
             generator: torch.Generator | None = None) -> list[list[int]]:
    """The new tokens of each prompt (a stop token, if reached, is not included)."""
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for tokens in stream(model, prompts, sampling, stop_ids=stop_ids, generator=generator):
        for i, t in enumerate(tokens.tolist()):
            if finished[i] or t < 0:
                continue
            if t in stop_ids:
                finished[i] = True
            else:
                out[i].append(t)
    return out
