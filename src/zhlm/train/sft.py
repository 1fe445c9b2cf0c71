"""SFT: ChatML conversations, loss on the assistant's tokens only."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from zhlm.io import read_parquet
from zhlm.model import load_model, save_pretrained
from zhlm.tokenizer.chat import IGNORE, chat_stop_ids, encode_chats, messages_of
from zhlm.train import distributed
from zhlm.train.loop import finish, start, train
from zhlm.train.pretrain import check_context, lm_loss

log = logging.getLogger("zhlm.sft")


def encode_rows(tokenizer, rows: list[dict], max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, labels) of each row, cut to max_len tokens; rows with no label left are skipped and counted."""
    examples, skipped = [], 0
    for ids, labels in encode_chats(tokenizer, [messages_of(row) for row in rows]):
        ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE for label in labels[1:]):
            skipped += 1
            continue
        examples.append((ids, labels))
    return examples, skipped


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs and next-token labels (IGNORE on padding)."""
    length = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        labels[i, :len(lab) - 1] = torch.tensor(lab[1:])
    return {"input_ids": inputs, "labels": labels}


class Examples:
    """Batches drawn in a fresh shuffled order each epoch; the batch of step s depends only on (seed, s)."""

    def __init__(self, items: list, global_batch: int, seed: int, collate, count=None):
        if not items:
            raise ValueError("no training examples")
        self.items, self.batch_size, self.seed, self.collate = items, global_batch, seed, collate
        self.count = count or count_labels

    def indices(self, step: int) -> list[int]:
        n, out = len(self.items), []
        position = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(position, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            take = order[offset:offset + self.batch_size - len(out)]
            out.extend(int(i) for i in take)
            position += len(take)
        return out

    def global_batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.collate([self.items[i] for i in self.indices(step)])


def count_labels(batch) -> int:
    return int((batch["labels"] != IGNORE).sum())


def sft_loss(model, batch):
    """Each conversation weighs the same: the mean loss over its answer tokens, summed over rows.

    A per-token mean would let long answers drown short ones (a two-token
    polarity label next to an idiom's explanation).
    """
    logits = model(batch["input_ids"]).float()
    labels = batch["labels"]
    per_token = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                                reduction="none").view(labels.shape)
    counts = (labels != IGNORE).sum(-1)
    loss = (per_token.sum(-1) / counts.clamp(min=1)).sum()
    return loss, int((counts > 0).sum()), {}


def count_rows(batch) -> int:
    return int(((batch["labels"] != IGNORE).sum(-1) > 0).sum())


@torch.no_grad()
def examples_loss(model, examples, pad_id: int, batch_size: int = 16) -> float:
    """Mean loss per labelled token over `examples` (the validation loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[i:i + batch_size], pad_id).items()}
        loss, n, _ = lm_loss(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(1, count)


def run(init_dir, tokenizer_dir, train_parquet, eval_parquet, out_dir, ckpt_dir, *, settings: dict,
        progress: bool = True) -> list[dict]:
    """Fine-tune the model in init_dir on ChatML conversations; write a HF model folder to out_dir.

    settings: TrainConfig fields plus seq_len (longest example, in tokens) and eval_examples.
    """
    init_dir = Path(init_dir)
    cfg, device, fingerprint = start(settings, [init_dir / "model.safetensors", train_parquet, eval_parquet])
    model = load_model(init_dir, device)
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    check_context(model.config, settings["seq_len"])
    max_len = settings["seq_len"] + 1
    examples, skipped = encode_rows(tokenizer, read_parquet(train_parquet).to_pylist(), max_len)
    eval_rows = sorted(read_parquet(eval_parquet).to_pylist(), key=lambda r: r["id"])
    val_examples, _ = encode_rows(tokenizer, eval_rows[:settings.get("eval_examples", 256)], max_len)
    log.info("%d training conversations (%d skipped: no answer token within %d tokens)",
             len(examples), skipped, max_len)
    pad = model.config.pad_token_id
    mean_len = float(np.mean([len(ids) - 1 for ids, _ in examples]))
    history = train(model, Examples(examples, cfg.global_batch, cfg.seed, lambda b: pad_batch(b, pad), count_rows),
                    sft_loss, cfg, out_dir=out_dir, ckpt_dir=ckpt_dir, fingerprint=fingerprint,
                    evaluate=lambda m: {"val_loss": examples_loss(m, val_examples, pad)},
                    flops_per_item=model.flops_per_token(int(mean_len)) * mean_len, tokens_per_item=mean_len,
                    progress=progress)
    if distributed.rank() == 0:
        save_pretrained(model, out_dir, tokenizer_dir, eos_token_ids=chat_stop_ids(tokenizer))
    finish(ckpt_dir)
    distributed.shutdown()
    return history
