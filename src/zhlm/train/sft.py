"""SFT: ChatML conversations, loss on the assistant's tokens only."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from zhlm.io import read_json
from zhlm.lm import IGNORE, check_context, count_labels, lm_loss, pad_batch, token_nll
from zhlm.model import load_model, save_pretrained
from zhlm.tokenizer.chat import chat_stop_ids
from zhlm.tokenizer.conversations import NO_ANSWER, Conversations, check_tokenizer, token_folder_files
from zhlm.train import distributed
from zhlm.train.batches import Concatenated, Examples, TextWindows
from zhlm.train.loop import finish, start, train
from zhlm.train.lora import add_adapter, save_adapter

log = logging.getLogger("zhlm.sft")


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
        chunk = [examples[j] for j in range(i, min(i + batch_size, len(examples)))]
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
        total += lm_loss(model, batch["input_ids"], batch["labels"]).item()
        count += count_labels(batch["labels"])
    model.train(was_training)
    return total / max(1, count)


def with_mixed_in(examples, max_len: int, seed: int, *, pretrain_tokens_dir=None, pretrain_share: float = 0.0,
                  sft_tokens_dir=None, sft_share: float = 0.0):
    """The conversations followed by what is mixed in, each a share of all the items:
    - pretrain_share: windows of pretraining text (every token labelled), each as long as the
      average conversation, so that mixing in text does not lengthen the padded batches;
    - sft_share: the sft stage's training conversations (a finetune keeps the tasks it has),
      a random choice of them, or all of them where there are fewer."""
    total = len(examples) / (1 - pretrain_share - sft_share)
    parts = [examples]
    if sft_share:
        meta = read_json(Path(sft_tokens_dir) / "meta.json")
        conversations, _ = Conversations(sft_tokens_dir, "train", meta["dtype"]).cut(max_len)
        count = min(round(total * sft_share), len(conversations))
        pick = np.random.default_rng([seed, 1]).choice(len(conversations), size=count, replace=False)
        parts.append(conversations.select(np.sort(pick)))
        log.info("mixing in %d of the sft stage's %d conversations", count, len(conversations))
    if pretrain_share:
        meta = read_json(Path(pretrain_tokens_dir) / "meta.json")["train"]
        tokens = np.memmap(Path(pretrain_tokens_dir) / "train.bin", dtype=meta["dtype"], mode="r")
        count = round(total * pretrain_share)
        parts.append(TextWindows(tokens, int(np.mean(examples.lengths())), count, seed))
        log.info("mixing in %d windows of %d pretraining tokens", count, parts[-1].length)
    return Concatenated(*parts) if len(parts) > 1 else examples


def run(init_dir, tokenizer_dir, tokens_dir, out_dir, ckpt_dir, *, settings: dict, pretrain_tokens_dir=None,
        sft_tokens_dir=None, progress: bool = True) -> list[dict]:
    """Fine-tune the model in init_dir on ChatML conversations; write a HF model folder to out_dir,
    or with `lora` in the settings the adapter, in peft's format (zhlm.train.lora).

    tokens_dir: the SFT splits' token files (zhlm.tokenizer.conversations.tokenize_sft).
    settings: TrainConfig fields (seq_len: longest example, in tokens; eval_examples; pretrain_mix,
    which needs pretrain_tokens_dir, the pretraining token files; sft_mix, which needs
    sft_tokens_dir, the sft stage's token files; lora).
    """
    init_dir, tokens_dir = Path(init_dir), Path(tokens_dir)
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    mixed = []
    if settings.get("pretrain_mix"):
        if pretrain_tokens_dir is None:
            raise ValueError("pretrain_mix needs the pretraining token files")
        mixed += [Path(pretrain_tokens_dir) / name for name in ("train.bin", "meta.json")]
    if settings.get("sft_mix"):
        if sft_tokens_dir is None:
            raise ValueError("sft_mix needs the sft stage's token files")
        check_tokenizer(sft_tokens_dir, tokenizer_file)
        mixed += token_folder_files(sft_tokens_dir)
    cfg, device, fingerprint = start(settings, [init_dir / "model.safetensors", tokenizer_file,
                                                *token_folder_files(tokens_dir), *mixed])
    model = load_model(init_dir, device)
    if cfg.lora:
        add_adapter(model, cfg.lora)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    meta = check_tokenizer(tokens_dir, tokenizer_file)
    check_context(model.config, cfg.seq_len)
    max_len = cfg.seq_len + 1  # seq_len inputs and their seq_len next tokens
    examples, skipped = Conversations(tokens_dir, "train", meta["dtype"]).cut(max_len)
    val_examples, _ = Conversations(tokens_dir, "eval", meta["dtype"]).first_by_id(cfg.eval_examples).cut(max_len)
    log.info("%d training conversations (%d skipped: no answer token within %d tokens; %d with none at all "
             "left out when tokenising)", len(examples), skipped, max_len, meta["train"]["skipped"][NO_ANSWER])
    pad = model.config.pad_token_id
    mean_len = float(np.mean(examples.lengths() - 1))
    if cfg.pretrain_mix or cfg.sft_mix:
        examples = with_mixed_in(examples, max_len, cfg.seed, pretrain_tokens_dir=pretrain_tokens_dir,
                                 pretrain_share=cfg.pretrain_mix, sft_tokens_dir=sft_tokens_dir,
                                 sft_share=cfg.sft_mix)
    data = Examples(examples, cfg.global_batch, cfg.seed, lambda b: pad_batch(b, pad), count_conversations,
                    lengths=examples.lengths() if cfg.group_by_length else None)
    history = train(model, data, sft_loss, cfg, out_dir=out_dir, ckpt_dir=ckpt_dir, fingerprint=fingerprint,
                    evaluate=lambda m: {"val_loss": examples_loss(m, val_examples, pad)},
                    flops_per_item=model.flops_per_token(int(mean_len)) * mean_len, tokens_per_item=mean_len,
                    progress=progress)
    if distributed.rank() == 0:
        if cfg.lora:  # merge_lora makes the model folder
            save_adapter(model, out_dir, cfg.lora, base_model=init_dir)
        else:
            save_pretrained(model, out_dir, tokenizer_dir, eos_token_ids=chat_stop_ids(tokenizer))
    finish(ckpt_dir)
    distributed.shutdown()
    return history
