import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from zhlm.io import write_parquet
from zhlm.tokenizer.binarize import binarize, load_tokens, token_dtype


def byte_tokenizer(path, extra_vocab=0):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0} | {ch: i + 1 for i, ch in enumerate(sorted(alphabet))}
    vocab |= {f"extra{i}": len(vocab) + i for i in range(extra_vocab)}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return tok


def test_token_dtype():
    assert token_dtype(8000) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_documents_round_trip_through_the_token_file(tmp_path):
    tok = byte_tokenizer(tmp_path / "tok.json")
    texts = ["你好，世界", "第二篇\n文档 with English", "", "🙂 emoji", None, "last"]
    write_parquet(pa.table({"text": pa.array(texts, pa.string())}), tmp_path / "docs.parquet")
    meta = binarize(tmp_path / "docs.parquet", tmp_path / "tok.json", tmp_path / "docs.bin",
                    batch_size=2, progress=False)
    ids = load_tokens(tmp_path / "docs.bin", meta["dtype"])
    assert meta["tokens"] == ids.size == (tmp_path / "docs.bin").stat().st_size // 2
    assert meta["documents"] == 4  # empty and null texts carry no document
    docs = np.split(ids, np.flatnonzero(ids == meta["eot_id"]) + 1)[:-1]
    assert [tok.decode(d[:-1].tolist()) for d in docs] == [t for t in texts if t]


def test_shard_files_give_the_token_file_of_their_concatenation(tmp_path):
    byte_tokenizer(tmp_path / "tok.json")
    texts = ["一", "二三", "", "四五六", "七"]
    write_parquet(pa.table({"text": texts}), tmp_path / "all.parquet")
    shards = [tmp_path / "0.parquet", tmp_path / "1.parquet", tmp_path / "2.parquet"]
    for shard, part in zip(shards, (texts[:2], [], texts[2:])):
        write_parquet(pa.table({"text": pa.array(part, pa.string())}), shard)
    whole = binarize(tmp_path / "all.parquet", tmp_path / "tok.json", tmp_path / "all.bin", progress=False)
    sharded = binarize(shards, tmp_path / "tok.json", tmp_path / "sharded.bin", batch_size=1, progress=False)
    assert (tmp_path / "all.bin").read_bytes() == (tmp_path / "sharded.bin").read_bytes()
    assert {**whole, "file": None} == {**sharded, "file": None}


def test_large_vocab_uses_uint32(tmp_path):
    byte_tokenizer(tmp_path / "tok.json", extra_vocab=70000)
    write_parquet(pa.table({"text": ["abc"]}), tmp_path / "d.parquet")
    meta = binarize(tmp_path / "d.parquet", tmp_path / "tok.json", tmp_path / "d.bin", progress=False)
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "d.bin").stat().st_size == 4 * meta["tokens"] == 4 * 4


def test_each_source_has_its_token_spans(tmp_path):
    tok = byte_tokenizer(tmp_path / "tok.json")
    # Files in source order, as split files come; "b" comes back after "c" in the last file.
    parts = [(["a", "a"], ["一", "二三"]), (["b", "c", "c"], ["四五六", None, "七"]), (["c", "b"], ["八九", "十"])]
    files = []
    for k, (sources, texts) in enumerate(parts):
        files.append(tmp_path / f"{k}.parquet")
        write_parquet(pa.table({"id": [str(i) for i in range(len(texts))], "source": sources,
                                "text": pa.array(texts, pa.string())}), files[-1])
    meta = binarize(files, tmp_path / "tok.json", tmp_path / "t.bin", batch_size=2, progress=False)
    ids = load_tokens(tmp_path / "t.bin", meta["dtype"])
    # Each character is 3 bytes of UTF-8, a token each, and one <|endoftext|> ends each document.
    assert meta["sources"] == {"a": [[0, 11]], "b": [[11, 21], [32, 36]], "c": [[21, 32]]}
    texts = {name: [tok.decode(ids[a:b].tolist()) for a, b in runs] for name, runs in meta["sources"].items()}
    assert texts == {"a": ["一二三"], "b": ["四五六", "十"], "c": ["七八九"]}


def test_files_without_a_source_column_give_no_spans(tmp_path):
    byte_tokenizer(tmp_path / "tok.json")
    write_parquet(pa.table({"text": ["一", "二"]}), tmp_path / "d.parquet")
    assert "sources" not in binarize(tmp_path / "d.parquet", tmp_path / "tok.json", tmp_path / "d.bin", progress=False)
