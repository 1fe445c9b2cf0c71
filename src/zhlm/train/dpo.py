"""DPO: preference pairs against a frozen reference whose log-probabilities are computed once."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zhlm.tokenizer.chat import IGNORE
from zhlm.train.sft import pad_batch


def sequence_logp(model, input_ids, labels) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each row."""
    logits = model(input_ids).float()
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * mask).sum(-1)


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
    def loss_fn(model, batch):
        chosen = sequence_logp(model, batch["chosen_ids"], batch["chosen_labels"])
        rejected = sequence_logp(model, batch["rejected_ids"], batch["rejected_labels"])
        losses, margin = dpo_losses(chosen, rejected, batch["ref_chosen"].to(chosen.dtype),
                                    batch["ref_rejected"].to(chosen.dtype), beta)
        metrics = {"reward_accuracy": float((margin > 0).sum()), "reward_margin": float(margin.sum())}
        return losses.sum(), len(losses), metrics
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
