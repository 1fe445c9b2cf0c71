"""DPO: preference pairs against a frozen reference whose log-probabilities are computed once."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from zhlm.lm import IGNORE, check_context, pad_batch, sequence_logp, token_logp
from zhlm.model import load_model, save_pretrained
from zhlm.tokenizer.chat import chat_stop_ids
from zhlm.tokenizer.conversations import Conversations, check_tokenizer, token_folder_files
from zhlm.train import distributed
from zhlm.train.batches import Examples
from zhlm.train.loop import finish, start, train
from zhlm.train.lora import add_adapter, save_adapter
from zhlm.train.sft import sft_loss

log = logging.getLogger("zhlm.dpo")


# A rejected answer's token repeats when it completes a run of REPEAT_NGRAM tokens seen earlier in it.
REPEAT_NGRAM = 4


def repeated_tokens(labels: torch.Tensor, n: int = REPEAT_NGRAM) -> torch.Tensor:
    """(B, T) bool: the labelled tokens that complete an n-gram of labelled tokens already seen
    earlier in their row (a loop's tokens after its first turn)."""
    out = torch.zeros(labels.shape, dtype=torch.bool)
    for row, row_labels in enumerate(labels.tolist()):
        positions = [t for t, label in enumerate(row_labels) if label != IGNORE]
        seen = set()
        for k in range(n - 1, len(positions)):
            gram = tuple(row_labels[positions[j]] for j in range(k - n + 1, k + 1))
            if gram in seen:
                out[row, positions[k]] = True
            seen.add(gram)
    return out


def collate_pairs(pairs, pad_id: int, mark_repeats: bool = False) -> dict[str, torch.Tensor]:
    """pairs: (chosen (ids, labels), rejected (ids, labels), ref_chosen, ref_rejected[, anchor (ids, labels)]).

    With mark_repeats, rejected_repeats marks the rejected answers' repeated tokens (repeated_tokens,
    which the unlikelihood term needs). An anchor (WithAnchors) becomes row i of anchor_ids and
    anchor_labels, beside its pair's row."""
    chosen = pad_batch([p[0] for p in pairs], pad_id)
    rejected = pad_batch([p[1] for p in pairs], pad_id)
    batch = {"chosen_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
             "rejected_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
             "ref_chosen": torch.tensor([p[2] for p in pairs], dtype=torch.float64),
             "ref_rejected": torch.tensor([p[3] for p in pairs], dtype=torch.float64)}
    if mark_repeats:
        batch["rejected_repeats"] = repeated_tokens(rejected["labels"])
    if len(pairs[0]) == 5:
        anchors = pad_batch([p[4] for p in pairs], pad_id)
        batch |= {"anchor_ids": anchors["input_ids"], "anchor_labels": anchors["labels"]}
    return batch


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO loss -log σ(β((π_c − ref_c) − (π_r − ref_r))) and the reward margin."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin


def make_dpo_loss(beta: float, sft_weight: float = 0.0, anchor_weight: float = 0.0, unlikelihood_weight: float = 0.0):
    """The DPO loss summed over the batch's pairs (the unit the pairs' batch source counts).

    sft_weight > 0 adds that weight times the chosen answer's mean per-token negative
    log-likelihood (RPO): DPO alone can lower the chosen answer's likelihood along with the
    rejected one's, which a small model pays for in degenerate, looping answers.
    anchor_weight > 0 adds that weight times the mean per-token NLL of each pair's anchor, one of
    the sft stage's conversations (WithAnchors): the pairs cover some tasks, and the others drift.
    unlikelihood_weight > 0 adds that weight times the mean unlikelihood loss −log(1 − p) of the
    rejected answer's repeated tokens (Welleck et al. 2019, sequence-level): the loops themselves
    made improbable, which DPO's margin, saturating once the pair is ranked, stops doing.
    """
    def loss_fn(model, batch):
        chosen = sequence_logp(model, batch["chosen_ids"], batch["chosen_labels"])             # (B,)
        rejected_tokens = token_logp(model, batch["rejected_ids"], batch["rejected_labels"])  # (B, T)
        rejected = rejected_tokens.sum(-1)                                                    # (B,)
        losses, margin = dpo_losses(chosen, rejected, batch["ref_chosen"].to(chosen.dtype),
                                    batch["ref_rejected"].to(chosen.dtype), beta)
        margin = margin.detach()
        metrics = {"reward_accuracy": float((margin > 0).sum()), "reward_margin": float(margin.sum())}
        if sft_weight:
            chosen_nll = -chosen / (batch["chosen_labels"] != IGNORE).sum(-1).clamp(min=1)  # (B,) per token
            losses = losses + sft_weight * chosen_nll
            metrics["chosen_nll"] = float(chosen_nll.detach().sum())
        if unlikelihood_weight:
            repeats = batch["rejected_repeats"]
            # −log(1 − p) of each repeated token, p clamped below 1 so a certain loop costs a finite loss.
            unlikely = -torch.log1p(-rejected_tokens.exp().clamp(max=1 - 1e-4)) * repeats  # (B, T)
            unlikely = unlikely.sum(-1) / repeats.sum(-1).clamp(min=1)                    # (B,)
            losses = losses + unlikelihood_weight * unlikely
            metrics["repeat_unlikelihood"] = float(unlikely.detach().sum())
        if anchor_weight:
            anchor_nll, _ = sft_loss(model, {"input_ids": batch["anchor_ids"], "labels": batch["anchor_labels"]})
            metrics["anchor_nll"] = float(anchor_nll.detach())
            return losses.sum() + anchor_weight * anchor_nll, metrics
        return losses.sum(), metrics
    return loss_fn


class Pairs:
    """Preference pairs from token files: item i is (chosen (ids, labels), rejected (ids, labels), ref_c, ref_r).

    chosen, rejected: Conversations views of the same pairs; refs: (n, 2) float64 reference
    log-probabilities of chosen and rejected (zeros until `with_reference`).
    """

    def __init__(self, chosen: Conversations, rejected: Conversations, refs: np.ndarray | None = None):
        self.chosen, self.rejected = chosen, rejected
        self.refs = np.zeros((len(chosen), 2)) if refs is None else refs   # (n, 2)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> tuple:
        return self.chosen[i], self.rejected[i], float(self.refs[i, 0]), float(self.refs[i, 1])

    def lengths(self) -> np.ndarray:
        """Each pair's longer side, (n,): what its batch is padded to."""
        return np.maximum(self.chosen.lengths(), self.rejected.lengths())

    def mean_length(self) -> float:
        """Mean tokens predicted per pair (chosen and rejected together)."""
        return float(np.mean(self.chosen.lengths() + self.rejected.lengths() - 2)) if len(self) else 0.0


class WithAnchors:
    """Pairs, each with an anchor: one of `conversations` (the sft stage's), a seeded random choice
    without repeats while there are enough. Item i is the pair's item followed by (ids, labels)."""

    def __init__(self, pairs: Pairs, conversations, seed: int):
        self.pairs, self.conversations = pairs, conversations
        rng = np.random.default_rng([seed, 2])
        self.choice = np.concatenate([rng.permutation(len(conversations))
                                      for _ in range(-(-len(pairs) // len(conversations)))])[:len(pairs)]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple:
        return (*self.pairs[i], self.conversations[int(self.choice[i])])

    def lengths(self) -> np.ndarray:
        return self.pairs.lengths()


def open_pairs(tokens_dir, split: str, max_len: int, dtype: str) -> Pairs:
    """The pairs of one split, each conversation cut to max_len tokens."""
    return Pairs(*(Conversations(tokens_dir, f"{split}.{side}", dtype).truncated(max_len)
                   for side in ("chosen", "rejected")))


@torch.no_grad()
def reference_logps(model, pairs: Pairs, pad_id: int, batch_size: int = 16) -> np.ndarray:
    """Log-probabilities (n, 2) of chosen and rejected under the frozen reference, computed once."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(pairs), 2))
    for i in range(0, len(pairs), batch_size):
        rows = range(i, min(i + batch_size, len(pairs)))
        for column, side in enumerate((pairs.chosen, pairs.rejected)):
            batch = pad_batch([side[j] for j in rows], pad_id)
            out[rows.start:rows.stop, column] = sequence_logp(
                model, batch["input_ids"].to(device), batch["labels"].to(device)).double().cpu().numpy()
    return out


def with_reference(reference, pairs: Pairs, pad_id: int) -> Pairs:
    """The pairs with the reference's log-probabilities of both answers."""
    return Pairs(pairs.chosen, pairs.rejected, reference_logps(reference, pairs, pad_id))


@torch.no_grad()
def reward_metrics(policy, items, beta: float, pad_id: int, batch_size: int = 16) -> dict:
    """Reward accuracy and mean margin of the implicit DPO reward on (encoded pair, ref_c, ref_r) items."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    correct, margin_sum = 0, 0.0
    for i in range(0, len(items), batch_size):
        chunk = [items[j] for j in range(i, min(i + batch_size, len(items)))]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
        c = sequence_logp(policy, batch["chosen_ids"], batch["chosen_labels"]).double()
        r = sequence_logp(policy, batch["rejected_ids"], batch["rejected_labels"]).double()
        _, margin = dpo_losses(c, r, batch["ref_chosen"], batch["ref_rejected"], beta)
        correct += int((margin > 0).sum())
        margin_sum += float(margin.sum())
    policy.train(was_training)
    n = max(1, len(items))
    return {"val_reward_accuracy": correct / n, "val_reward_margin": margin_sum / n}


def run(sft_dir, tokenizer_dir, tokens_dir, out_dir, ckpt_dir, *, settings: dict, sft_tokens_dir=None,
        progress: bool = True) -> list[dict]:
    """DPO from the SFT model against itself, frozen, as the reference; write a HF folder to out_dir,
    or with `lora` in the settings the adapter, in peft's format (zhlm.train.lora).

    tokens_dir: the pairs' token files (zhlm.tokenizer.conversations.tokenize_dpo); its eval
    pairs are held out and scored. settings: TrainConfig fields (beta, seq_len, sft_weight,
    anchor_weight, which needs sft_tokens_dir, the sft stage's token files; lora).
    """
    sft_dir, tokens_dir = Path(sft_dir), Path(tokens_dir)
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    anchor_files = []
    if settings.get("anchor_weight"):
        if sft_tokens_dir is None:
            raise ValueError("anchor_weight needs the sft stage's token files")
        anchor_dtype = check_tokenizer(sft_tokens_dir, tokenizer_file)["dtype"]
        anchor_files = token_folder_files(sft_tokens_dir)
    cfg, device, fingerprint = start(settings, [sft_dir / "model.safetensors", tokenizer_file,
                                                *token_folder_files(tokens_dir), *anchor_files])
    policy = load_model(sft_dir, device)
    # The frozen reference is the SFT model. With LoRA that is the policy before its adapter is
    # added (TRL uses the policy with its adapter disabled): no second copy of the weights.
    reference = policy if cfg.lora else load_model(sft_dir, device).eval().requires_grad_(False)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    meta = check_tokenizer(tokens_dir, tokenizer_file)
    check_context(policy.config, cfg.seq_len)
    pad, beta, max_len = policy.config.pad_token_id, cfg.beta, cfg.seq_len + 1

    # Each pair's reference log-probs of chosen and rejected, (n, 2); the reference is then freed.
    items, eval_items = (with_reference(reference, open_pairs(tokens_dir, split, max_len, meta["dtype"]), pad)
                         for split in ("train", "eval"))
    del reference
    if cfg.lora:
        add_adapter(policy, cfg.lora)
    log.info("%d training pairs, %d held-out pairs", len(items), len(eval_items))
    mean_len = items.mean_length()
    if cfg.anchor_weight:
        anchors, _ = Conversations(sft_tokens_dir, "train", anchor_dtype).cut(max_len)
        if not len(anchors):
            raise ValueError(f"anchor_weight: {sft_tokens_dir} has no training conversation to anchor the pairs")
        items = WithAnchors(items, anchors, cfg.seed)
        log.info("each pair anchored by one of the sft stage's %d conversations", len(anchors))
        mean_len += float(np.mean(anchors.lengths() - 1))
    data = Examples(items, cfg.global_batch, cfg.seed, lambda b: collate_pairs(b, pad, cfg.unlikelihood_weight > 0),
                    count=lambda b: len(b["ref_chosen"]),  # pairs
                    lengths=items.lengths() if cfg.group_by_length else None)
    loss_fn = make_dpo_loss(beta, cfg.sft_weight, cfg.anchor_weight, cfg.unlikelihood_weight)
    history = train(policy, data, loss_fn, cfg, out_dir=out_dir, ckpt_dir=ckpt_dir, fingerprint=fingerprint,
                    evaluate=(lambda m: reward_metrics(m, eval_items, beta, pad)) if len(eval_items) else None,
                    flops_per_item=policy.flops_per_token(int(mean_len / 2)) * mean_len,
                    tokens_per_item=mean_len, progress=progress)
    if distributed.rank() == 0:
        if cfg.lora:  # merge_lora makes the model folder
            save_adapter(policy, out_dir, cfg.lora, base_model=sft_dir)
        else:
            save_pretrained(policy, out_dir, tokenizer_dir, eos_token_ids=chat_stop_ids(tokenizer))
    finish(ckpt_dir)
    distributed.shutdown()
    return history
