"""DPO: preference pairs against a frozen reference whose log-probabilities are computed once."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from zhlm.io import read_parquets
from zhlm.lm import check_context, pad_batch, sequence_logp
from zhlm.model import load_model, save_pretrained
from zhlm.tokenizer.chat import chat_stop_ids, encode_chats, messages_of
from zhlm.train import distributed
from zhlm.train.batches import Examples
from zhlm.train.loop import finish, start, train

log = logging.getLogger("zhlm.dpo")


def collate_pairs(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """pairs: (chosen (ids, labels), rejected (ids, labels), ref_chosen, ref_rejected)."""
    chosen = pad_batch([p[0] for p in pairs], pad_id)
    rejected = pad_batch([p[1] for p in pairs], pad_id)
    return {"chosen_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
            "rejected_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
            "ref_chosen": torch.tensor([p[2] for p in pairs], dtype=torch.float64),
            "ref_rejected": torch.tensor([p[3] for p in pairs], dtype=torch.float64)}


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss -log σ(β((π_c − ref_c) − (π_r − ref_r))) and the reward margin."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def make_dpo_loss(beta: float):
    """The DPO loss summed over the batch's pairs (the unit the pairs' batch source counts)."""
    def loss_fn(model, batch):
        chosen = sequence_logp(model, batch["chosen_ids"], batch["chosen_labels"])
        rejected = sequence_logp(model, batch["rejected_ids"], batch["rejected_labels"])
        losses, margin = dpo_losses(chosen, rejected, batch["ref_chosen"].to(chosen.dtype),
                                    batch["ref_rejected"].to(chosen.dtype), beta)
        margin = margin.detach()
        metrics = {"reward_accuracy": float((margin > 0).sum()), "reward_margin": float(margin.sum())}
        return losses.sum(), metrics
    return loss_fn


@torch.no_grad()
def reference_logps(model, pairs_encoded, pad_id: int, batch_size: int = 16) -> list[tuple[float, float]]:
    """Log-probabilities of chosen and rejected under the frozen reference, computed once."""
    model.eval()
    out = []
    for i in range(0, len(pairs_encoded), batch_size):
        chunk = pairs_encoded[i:i + batch_size]
        c = pad_batch([p[0] for p in chunk], pad_id)
        r = pad_batch([p[1] for p in chunk], pad_id)
        lc = sequence_logp(model, c["input_ids"], c["labels"]).tolist()
        lr = sequence_logp(model, r["input_ids"], r["labels"]).tolist()
        out.extend(zip(lc, lr))
    return out


def with_reference(reference, encoded: list[tuple], pad_id: int) -> list[tuple]:
    """Each encoded (chosen, rejected) pair with the reference's log-probabilities of both."""
    refs = reference_logps(reference, encoded, pad_id)
    return [(c, r, rc, rr) for (c, r), (rc, rr) in zip(encoded, refs)]


def encode_pairs(tokenizer, rows: list[dict], max_len: int) -> list[tuple]:
    """((chosen ids, labels), (rejected ids, labels)) of each pair, as ChatML conversations cut to max_len."""
    def conversations(answer_field):
        return [messages_of({**row, "response": row[answer_field]}) for row in rows]

    chosen = encode_chats(tokenizer, conversations("chosen"))
    rejected = encode_chats(tokenizer, conversations("rejected"))
    return [((c[0][:max_len], c[1][:max_len]), (r[0][:max_len], r[1][:max_len])) for c, r in zip(chosen, rejected)]


@torch.no_grad()
def reward_metrics(policy, items, beta: float, pad_id: int, batch_size: int = 16) -> dict:
    """Reward accuracy and mean margin of the implicit DPO reward on (encoded pair, ref_c, ref_r) items."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    correct, margin_sum = 0, 0.0
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(items[i:i + batch_size], pad_id).items()}
        c = sequence_logp(policy, batch["chosen_ids"], batch["chosen_labels"]).double()
        r = sequence_logp(policy, batch["rejected_ids"], batch["rejected_labels"]).double()
        _, margin = dpo_losses(c, r, batch["ref_chosen"], batch["ref_rejected"], beta)
        correct += int((margin > 0).sum())
        margin_sum += float(margin.sum())
    policy.train(was_training)
    n = max(1, len(items))
    return {"val_reward_accuracy": correct / n, "val_reward_margin": margin_sum / n}


def run(sft_dir, tokenizer_dir, pair_files: list, out_dir, ckpt_dir, *, settings: dict, eval_files=(),
        progress: bool = True) -> list[dict]:
    """DPO from the SFT model against itself, frozen, as the reference; write a HF folder to out_dir.

    pair_files: parquet files of (id, prompt, chosen, rejected[, split]); their rows with
    split == "eval", and every row of eval_files, are held out and scored.
    settings: TrainConfig fields (beta, seq_len).
    """
    sft_dir = Path(sft_dir)
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    cfg, device, fingerprint = start(settings, [sft_dir / "model.safetensors", tokenizer_file,
                                                *pair_files, *eval_files])
    policy = load_model(sft_dir, device)
    reference = load_model(sft_dir, device).eval().requires_grad_(False)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    rows = read_parquets(pair_files).to_pylist()
    train_rows = [r for r in rows if r.get("split") != "eval"]
    eval_rows = [r for r in rows if r.get("split") == "eval"]
    if eval_files:
        eval_rows += read_parquets(eval_files).to_pylist()
    check_context(policy.config, cfg.seq_len)
    pad, beta, max_len = policy.config.pad_token_id, cfg.beta, cfg.seq_len + 1

    # (chosen, rejected, ref log-prob of chosen, of rejected) per pair; the reference is then freed.
    items, eval_items = (with_reference(reference, encode_pairs(tokenizer, part, max_len), pad)
                         for part in (train_rows, eval_rows))
    del reference
    log.info("%d training pairs, %d held-out pairs", len(items), len(eval_items))
    mean_len = float(np.mean([len(c[0]) + len(r[0]) - 2 for c, r, _, _ in items]))
    data = Examples(items, cfg.global_batch, cfg.seed, lambda b: collate_pairs(b, pad),
                    count=lambda b: len(b["ref_chosen"]))  # pairs
    history = train(policy, data, make_dpo_loss(beta), cfg, out_dir=out_dir, ckpt_dir=ckpt_dir,
                    fingerprint=fingerprint,
                    evaluate=(lambda m: reward_metrics(m, eval_items, beta, pad)) if eval_items else None,
                    flops_per_item=policy.flops_per_token(int(mean_len / 2)) * mean_len,
                    tokens_per_item=mean_len, progress=progress)
    if distributed.rank() == 0:
        save_pretrained(policy, out_dir, tokenizer_dir, eos_token_ids=chat_stop_ids(tokenizer))
    finish(ckpt_dir)
    distributed.shutdown()
    return history
