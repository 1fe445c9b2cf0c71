"""SFT and DPO data as token files: they decode to what encode_chats gives, and training from
them gives, step for step, the losses of the in-memory path they replace (kept here as the reference)."""
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer

from zhlm.data import demo
from zhlm.io import read_json, write_parquet
from zhlm.lm import IGNORE, pad_batch, sequence_logp
from zhlm.model import load_model
from zhlm.tokenizer.chat import encode_chats, messages_of
from zhlm.tokenizer.conversations import NO_ANSWER, Conversations, tokenize_dpo, tokenize_sft
from zhlm.train import dpo, sft
from zhlm.train.batches import Examples
from zhlm.train.loop import start, train

SETTINGS = {"steps": 6, "global_batch": 4, "micro_batch": 2, "seq_len": 40, "lr": 1e-3, "warmup_steps": 1,
            "eval_every": 3, "checkpoint_every": 3, "eval_examples": 8, "dtype": "fp32", "device": "cpu"}
FIELDS = ("id", "source", "prompt", "response", "system", "history")


def sft_rows():
    """Real SFT rows: short idiom answers, polarity questions on long reviews (cut away at a short
    seq_len), segmentation; a multi-turn row with a system prompt; rows with no answer at all."""
    rows = demo.idiom_tasks()[:30] + demo.polarity()[:30] + demo.segmentation()[:20]
    rows = [{"source": "demo", "system": None, "history": None, **r} for r in rows]
    rows.append({"id": "multi", "source": "demo", "prompt": "还有呢？", "response": "质量不错",
                 "system": "你是一个助手。", "history": json.dumps([{"role": "user", "content": "这本书怎么样？"},
                                                             {"role": "assistant", "content": "很好！"}])})
    rows += [{"id": f"none:{i}", "source": "demo", "prompt": "你好", "response": None, "system": None,
              "history": None} for i in range(2)]
    return [{k: r[k] for k in FIELDS} for r in rows]


def write_rows(rows, path):
    write_parquet(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def sft_data(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_data")
    rows = sft_rows()
    rng = np.random.default_rng(0)
    train_rows = [rows[i] for i in rng.permutation(len(rows))]
    eval_rows = [{**r, "id": f"eval:{r['id']}"} for r in rows[::-5]]  # not in id order
    train_files = [write_rows(train_rows[:40], root / "train0.parquet"),
                   write_rows(train_rows[40:], root / "train1.parquet")]
    eval_files = [write_rows(eval_rows, root / "eval.parquet")]
    tokenize_sft(train_files, eval_files, corpus / "tokenizer/tokenizer.json", root / "tokens", batch_size=16)
    return root, train_rows, eval_rows


def encode_rows(tokenizer, rows, max_len):
    """The in-memory path the token files replace: (ids, labels) lists of each row cut to max_len,
    less rows with no label left (counted)."""
    examples, skipped = [], 0
    for ids, labels in encode_chats(tokenizer, [messages_of(row) for row in rows]):
        ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE for label in labels[1:]):
            skipped += 1
            continue
        examples.append((ids, labels))
    return examples, skipped


def as_lists(example):
    ids, labels = example
    return ids.tolist(), labels.tolist()


def test_sft_token_files_decode_to_the_encoded_conversations(corpus, sft_data):
    root, train_rows, eval_rows = sft_data
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer/tokenizer.json"))
    meta = read_json(root / "tokens/meta.json")
    assert meta["dtype"] == "uint16" and meta["train"]["skipped"] == {NO_ANSWER: 2}
    whole, _ = encode_rows(tokenizer, train_rows, max_len=10**9)
    stored = Conversations(root / "tokens", "train")
    assert [as_lists(e) for e in stored] == whole and meta["train"]["examples"] == len(whole)
    assert meta["train"]["tokens"] == sum(len(ids) for ids, _ in whole)
    left_out = {}
    for max_len in (12, 41, 200):
        expected, skipped = encode_rows(tokenizer, train_rows, max_len)
        view, left_out[max_len] = stored.cut(max_len)
        assert [as_lists(e) for e in view] == expected
        assert left_out[max_len] + meta["train"]["skipped"][NO_ANSWER] == skipped
    assert left_out[12] > left_out[41] > left_out[200]  # long reviews leave no answer within the cut
    # The validation examples: the first eval_examples of the eval split in id order.
    first = sorted(eval_rows, key=lambda r: r["id"])[:8]
    expected, _ = encode_rows(tokenizer, first, 41)
    view, _ = Conversations(root / "tokens", "eval").first_by_id(8).cut(41)
    assert [as_lists(e) for e in view] == expected


def reference_sft(model_dir, tokenizer, train_rows, eval_rows, out):
    """SFT the way zhlm.train.sft.run did before token files: every example in memory as lists."""
    cfg, device, _ = start(SETTINGS, [])
    model = load_model(model_dir, device)
    max_len = cfg.seq_len + 1
    examples, _ = encode_rows(tokenizer, train_rows, max_len)
    val, _ = encode_rows(tokenizer, sorted(eval_rows, key=lambda r: r["id"])[:cfg.eval_examples], max_len)
    pad = model.config.pad_token_id
    data = Examples(examples, cfg.global_batch, cfg.seed, lambda b: pad_batch(b, pad), sft.count_conversations)
    return train(model, data, sft.sft_loss, cfg, out_dir=out, ckpt_dir=out / "_ckpt",
                 evaluate=lambda m: {"val_loss": sft.examples_loss(m, val, pad)}, progress=False)


def losses(history, keys):
    return [{k: row[k] for k in keys if k in row} for row in history]


def test_sft_from_token_files_gives_the_losses_of_the_in_memory_path(corpus, model_dir, sft_data, tmp_path):
    root, train_rows, eval_rows = sft_data
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer/tokenizer.json"))
    expected = reference_sft(model_dir, tokenizer, train_rows, eval_rows, tmp_path / "reference")
    history = sft.run(model_dir, corpus / "tokenizer", root / "tokens", tmp_path / "sft", tmp_path / "sft/_ckpt",
                      settings=SETTINGS, progress=False)
    keys = ("step", "loss", "grad_norm", "val_loss")
    assert len(history) == SETTINGS["steps"] and any("val_loss" in row for row in history)
    assert losses(history, keys) == losses(expected, keys)


def test_sft_refuses_token_files_of_another_tokenizer(corpus, model_dir, sft_data, tmp_path):
    root, _, _ = sft_data
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for path in (root / "tokens").iterdir():
        (tokens / path.name).write_bytes(path.read_bytes())
    meta = read_json(tokens / "meta.json")
    (tokens / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another tokenizer"):
        sft.run(model_dir, corpus / "tokenizer", tokens, tmp_path / "out", tmp_path / "out/_ckpt",
                settings=SETTINGS, progress=False)


# --- DPO --------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_data(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_data")
    rows = [r for r in sft_rows() if r["response"] is not None]
    rejected = [r["response"] for r in rows[1:] + rows[:1]]
    pairs = [{**{k: r[k] for k in FIELDS if k != "response"}, "chosen": r["response"], "rejected": other,
              "split": "eval" if i % 6 == 0 else "train"} for i, (r, other) in enumerate(zip(rows, rejected))]
    held_out = [{**p, "id": f"eval:{p['id']}", "split": None} for p in pairs[:7]]
    pair_files = [write_rows(pairs[:50], root / "pairs.parquet"), write_rows(pairs[50:], root / "dpo_train.parquet")]
    eval_files = [write_rows(held_out, root / "dpo_eval.parquet")]
    tokenize_dpo(pair_files, eval_files, corpus / "tokenizer/tokenizer.json", root / "tokens", batch_size=16)
    train_pairs = [p for p in pairs if p["split"] != "eval"]
    eval_pairs = [p for p in pairs if p["split"] == "eval"] + held_out
    return root, train_pairs, eval_pairs


def encode_pairs(tokenizer, rows, max_len):
    """The in-memory path: ((chosen ids, labels), (rejected ids, labels)) lists of each pair, cut to max_len."""
    def sides(field):
        return [(ids[:max_len], labels[:max_len]) for ids, labels in
                encode_chats(tokenizer, [messages_of({**r, "response": r[field]}) for r in rows])]
    return list(zip(sides("chosen"), sides("rejected")))


@torch.no_grad()
def with_reference(model, encoded, pad, batch_size=16):
    """(chosen, rejected, ref_c, ref_r) of each pair, the reference scored 16 pairs at a time."""
    model.eval()
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        c, r = (pad_batch([p[k] for p in chunk], pad) for k in (0, 1))
        refs = zip(sequence_logp(model, c["input_ids"], c["labels"]).tolist(),
                   sequence_logp(model, r["input_ids"], r["labels"]).tolist())
        out += [(*p, rc, rr) for p, (rc, rr) in zip(chunk, refs)]
    return out


def test_dpo_token_files_hold_every_pair_in_its_split(corpus, dpo_data):
    root, train_pairs, eval_pairs = dpo_data
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer/tokenizer.json"))
    meta = read_json(root / "tokens/meta.json")
    assert (meta["train"]["pairs"], meta["eval"]["pairs"]) == (len(train_pairs), len(eval_pairs))
    for split, rows in (("train", train_pairs), ("eval", eval_pairs)):
        pairs = dpo.open_pairs(root / "tokens", split, 41, meta["dtype"])
        assert [(as_lists(c), as_lists(r)) for c, r, _, _ in (pairs[i] for i in range(len(pairs)))] == \
            encode_pairs(tokenizer, rows, 41)


def test_dpo_from_token_files_gives_the_losses_of_the_in_memory_path(corpus, model_dir, dpo_data, tmp_path):
    root, train_pairs, eval_pairs = dpo_data
    tokenizer = Tokenizer.from_file(str(corpus / "tokenizer/tokenizer.json"))
    settings = {**SETTINGS, "beta": 0.5, "lr": 3e-3}
    cfg, device, _ = start(settings, [])
    policy = load_model(model_dir, device)
    reference = load_model(model_dir, device).eval().requires_grad_(False)
    pad, max_len = policy.config.pad_token_id, cfg.seq_len + 1
    items, eval_items = (with_reference(reference, encode_pairs(tokenizer, rows, max_len), pad)
                         for rows in (train_pairs, eval_pairs))
    data = Examples(items, cfg.global_batch, cfg.seed, lambda b: dpo.collate_pairs(b, pad),
                    count=lambda b: len(b["ref_chosen"]))
    expected = train(policy, data, dpo.make_dpo_loss(cfg.beta), cfg, out_dir=tmp_path / "reference",
                     ckpt_dir=tmp_path / "reference/_ckpt", progress=False,
                     evaluate=lambda m: dpo.reward_metrics(m, eval_items, cfg.beta, pad))
    history = dpo.run(model_dir, corpus / "tokenizer", root / "tokens", tmp_path / "dpo", tmp_path / "dpo/_ckpt",
                      settings=settings, progress=False)
    keys = ("step", "loss", "grad_norm", "reward_accuracy", "reward_margin", "val_reward_accuracy",
            "val_reward_margin")
    assert any("val_reward_margin" in row for row in history)
    assert losses(history, keys) == losses(expected, keys)


def test_mixed_in_shares_of_sft_conversations_and_pretraining_text(sft_data, corpus):
    """A finetune's sft_mix and pretrain_mix: each that share of all the items, the sft stage's
    conversations drawn without repeats, the text windows fully labelled, its own examples first."""
    root, _, _ = sft_data
    everything, _ = Conversations(root / "tokens", "train").cut(41)
    own = everything.select(range(5))
    mixed = sft.with_mixed_in(own, 41, 0, sft_tokens_dir=root / "tokens", sft_share=0.5,
                              pretrain_tokens_dir=corpus / "tokens", pretrain_share=0.25)
    assert len(everything) > 10 and len(mixed) == 20  # 5 own = 25%
    assert all(np.array_equal(mixed[i][0], own[i][0]) for i in range(5))
    drawn = {tuple(mixed[i][0]) for i in range(5, 15)}
    assert len(drawn) == 10 and drawn <= {tuple(ids) for ids, _ in everything}
    assert all(np.array_equal(ids, labels) for ids, labels in (mixed[i] for i in range(15, 20)))
    # Fewer conversations than the share asks for: all of them, once.
    assert len(sft.with_mixed_in(own, 41, 0, sft_tokens_dir=root / "tokens", sft_share=0.9)) == 5 + len(everything)
