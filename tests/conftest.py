"""Fixtures shared by the test modules: a small real corpus and a tiny model trained on it."""
import pyarrow as pa
import pytest
import torch

from zhlm.data import demo
from zhlm.io import write_json, write_parquet
from zhlm.tokenizer.binarize import binarize
from zhlm.tokenizer.bpe import build_from_texts, save_tokenizer
from zhlm.train import pretrain


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tokenizer (tokenizer/) and token files (tokens/) built from 600 real reviews."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [r["text"] for r in demo.reviews()[:600]]
    tokenizer, _, _ = build_from_texts(texts, 600)
    save_tokenizer(tokenizer, root / "tokenizer")
    meta = {}
    for split, part in (("train", texts[:500]), ("val", texts[500:])):
        write_parquet(pa.table({"text": part}), root / f"{split}.parquet")
        meta[split] = binarize(root / f"{split}.parquet", root / "tokenizer/tokenizer.json",
                               root / f"tokens/{split}.bin", progress=False)
    write_json(meta, root / "tokens/meta.json")
    return root


@pytest.fixture(scope="session")
def model_dir(corpus, tmp_path_factory):
    """A tiny model folder made by the pipeline's own pretraining code.

    The large init keeps greedy answers different from prompt to prompt, which the
    concurrency tests need to tell answers apart.
    """
    out = tmp_path_factory.mktemp("tiny_model")
    pretrain.run(corpus / "tokens", corpus / "tokenizer", out, out / "_ckpt",
                 model_settings={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.5,
                                 "max_position_embeddings": 128},
                 settings={"steps": 6, "global_batch": 8, "micro_batch": 8, "seq_len": 128, "lr": 3e-3,
                           "warmup_steps": 2, "eval_every": 6, "checkpoint_every": 6, "eval_windows": 2,
                           "dtype": "fp32"},
                 progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Decode on one thread: a tiny model gains nothing from more, and on a busy machine
    threads that wait for each other make each step orders of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
