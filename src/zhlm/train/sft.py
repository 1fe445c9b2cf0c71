"""SFT: ChatML conversations, loss on the assistant's tokens only."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from zhlm.io import as_paths, read_parquets
from zhlm.lm import IGNORE, check_context, count_labels, lm_loss, pad_batch, token_nll
from zhlm.model import load_model, save_pretrained
from zhlm.tokenizer.chat import chat_stop_ids, encode_chats, messages_of
from zhlm.train import distributed
from zhlm.train.batches import Examples
from zhlm.train.loop import finish, start, train

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


def sft_loss(model, batch):
    """Each conversation weighs the same: the mean loss over its answer tokens, summed over rows.

    A per-token mean would let long answers drown short ones (a two-token
    polarity label next to an idiom's explanation). count_conversations counts the same rows.
    """
    labels = batch["labels"]                                     # (B, T)
    per_token = token_nll(model(batch["input_ids"]), labels)     # (B, T), 0 where IGNORE
    counts = (labels != IGNORE).sum(-1)                          # (B,) answer tokens per conversation
    return (per_token.sum(-1) / counts.clamp(min=1)).sum(), {}


def count_conversations(batch) -> int:
    """Conversations with at least one answer token: the unit sft_loss sums over."""
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
        total += lm_loss(model, batch["input_ids"], batch["labels"]).item()
        count += count_labels(batch["labels"])
    model.train(was_training)
    return total / max(1, count)


def run(init_dir, tokenizer_dir, train_files, eval_files, out_dir, ckpt_dir, *, settings: dict,
        progress: bool = True) -> list[dict]:
    """Fine-tune the model in init_dir on ChatML conversations; write a HF model folder to out_dir.

    train_files, eval_files: the parquet files (a path or a list) of the training and held-out splits.
    settings: TrainConfig fields (seq_len: longest example, in tokens; eval_examples).
    """
    init_dir = Path(init_dir)
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    cfg, device, fingerprint = start(settings, [init_dir / "model.safetensors", tokenizer_file,
                                                *as_paths(train_files), *as_paths(eval_files)])
    model = load_model(init_dir, device)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    check_context(model.config, cfg.seq_len)
    max_len = cfg.seq_len + 1  # seq_len inputs and their seq_len next tokens
    examples, skipped = encode_rows(tokenizer, read_parquets(train_files).to_pylist(), max_len)
    eval_rows = sorted(read_parquets(eval_files).to_pylist(), key=lambda r: r["id"])
    val_examples, _ = encode_rows(tokenizer, eval_rows[:cfg.eval_examples], max_len)
    log.info("%d training conversations (%d skipped: no answer token within %d tokens)",
             len(examples), skipped, max_len)
    pad = model.config.pad_token_id
    mean_len = float(np.mean([len(ids) - 1 for ids, _ in examples]))
    data = Examples(examples, cfg.global_batch, cfg.seed, lambda b: pad_batch(b, pad), count_conversations)
    history = train(model, data, sft_loss, cfg, out_dir=out_dir, ckpt_dir=ckpt_dir, fingerprint=fingerprint,
                    evaluate=lambda m: {"val_loss": examples_loss(m, val_examples, pad)},
                    flops_per_item=model.flops_per_token(int(mean_len)) * mean_len, tokens_per_item=mean_len,
                    progress=progress)
    if distributed.rank() == 0:
        save_pretrained(model, out_dir, tokenizer_dir, eos_token_ids=chat_stop_ids(tokenizer))
    finish(ckpt_dir)
    distributed.shutdown()
    return history
