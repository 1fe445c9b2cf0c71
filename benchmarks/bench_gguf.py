"""A model folder exported to GGUF and run in llama.cpp (llama-cpp-python) beside zhlm itself.

    python benchmarks/bench_gguf.py [MODEL_DIR (default results/dpo)] [--out-dir DIR] [--new-tokens 64]
                                    [--threads N] [--texts 500]

Exports MODEL_DIR as f32, f16 and q8_0 GGUF files under --out-dir (a temporary folder by
default) and prints: their sizes; how many strings and tokens llama.cpp's tokenizer was
compared on against tokenizer.json (real demo text, English, emoji, mixed, whitespace, ChatML),
and how many differ; for each file, how many of the greedy tokens of the chat prompts below
equal zhlm's own greedy generation (and the first position where a prompt diverges); and
tokens/s at batch 1, llama.cpp beside zhlm's generate, both on --threads CPU threads. The f32
file runs with an f32 KV cache (llama.cpp's default cache is f16, as for the other files).
Needs llama-cpp-python (`pip install llama-cpp-python`, which compiles llama.cpp).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import llama_cpp
import torch
from tokenizers import Tokenizer

from zhlm.data import demo
from zhlm.export import DTYPES, export_gguf, llama_cpp_greedy
from zhlm.generate import Sampling, generate
from zhlm.inference import load
from zhlm.tokenizer.chat import encode_prompt

QUESTIONS = ["“画蛇添足”是什么意思？", "“守株待兔”出自哪里？", "用“亡羊补牢”造一个句子。",
             "请判断这条评论的情感倾向：质量很差，再也不买了。", "请判断这条评论的情感倾向：物流很快，包装完好。",
             "请给这句话分词：今天天气很好。", "“对牛弹琴”是什么意思？", "“胸有成竹”怎么读？"]
TEXTS = ["Hello, world! It's 2024; we're testing GPT-4o.", "好评👍👍 五星 🌟🚀", "emoji 👨‍👩‍👧 family 😶‍🌫️ ok",
         "价格 ¥1999，性价比高。\n\n  两个空格  and  spaces\t制表符", "<|im_start|>user\n你好<|im_end|>\n",
         "「引号」《书名》……——", "12345 67.89 3..3 1,000,000", "", " ", "\n\n\n", "ÀÉÎõü naïve café Ελληνικά русский",
         "中文English混合mixed文本text，标点。", "I'd've thought THEY'RE fine 'Ll", "𠀀𪛖 rare 龘", "a\r\nb\rc"]


def tokenizer_parity(llm, tokenizer: Tokenizer, texts: list[str]) -> tuple[int, int, list[str]]:
    """(strings, tokens compared, the strings tokenized differently)."""
    tokens, differ = 0, []
    for text in texts:
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        tokens += len(ours)
        if llm.tokenize(text.encode(), add_bos=False, special=True) != ours:
            differ.append(text)
    return len(texts), tokens, differ


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, int, list[int | None]]:
    """(tokens equal at their position, tokens compared, per prompt the first position that differs)."""
    equal = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ours, theirs)]
    return equal, sum(len(x) for x in ours), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default="results/dpo")
    parser.add_argument("--out-dir", help="where the GGUF files go (default: a temporary folder)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--texts", type=int, default=500, help="demo reviews and news lines in the tokenizer check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out_dir or tmp)
        files = {}
        for dtype in DTYPES:
            start = time.perf_counter()
            summary = export_gguf(args.model_dir, out_dir / f"model.{dtype}.gguf", dtype)
            files[dtype] = out_dir / f"model.{dtype}.gguf"
            print(f"{dtype:5s} {summary['bytes'] / 2**20:7.2f} MiB  tensors {summary['tensors']}  "
                  f"exported in {time.perf_counter() - start:.1f} s")
        run(args, files)


def run(args, files: dict[str, Path]) -> None:
    lm = load(args.model_dir, "cpu")
    tokenizer = lm.tokenizer
    n = args.new_tokens

    texts = [r["text"] for r in demo.reviews()[:args.texts // 2]] + [r["text"] for r in demo.news()[:args.texts // 2]]
    llm = llama_cpp.Llama(model_path=str(files["f16"]), vocab_only=True, verbose=False)
    strings, tokens, differ = tokenizer_parity(llm, tokenizer, texts + TEXTS)
    print(f"tokenizer: {strings} strings, {tokens} tokens compared; {len(differ)} strings differ {differ[:5]}")

    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    generate(lm.model, [prompts[0]], Sampling(max_new_tokens=4))  # warm up
    start = time.perf_counter()
    ours = [generate(lm.model, [p], Sampling(max_new_tokens=n))[0] for p in prompts]  # batch 1, no stop token
    zhlm_rate = sum(map(len, ours)) / (time.perf_counter() - start)
    print(f"zhlm generate (torch, {args.threads} threads, f32): {zhlm_rate:.0f} tokens/s at batch 1 "
          f"({len(prompts)} prompts x {n} greedy tokens)")
    for dtype, path in files.items():
        # The f32 file with an f32 KV cache: llama.cpp's default f16 cache rounds keys and values.
        cache = "f32" if dtype == "f32" else "f16"
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if cache == "f32" else {}
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=lm.context, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False, **kv)
        llama_cpp_greedy(llm, prompts[0], 4)  # warm up
        start = time.perf_counter()
        theirs = [llama_cpp_greedy(llm, p, n) for p in prompts]
        rate = sum(map(len, theirs)) / (time.perf_counter() - start)
        equal, compared, first = agreement(ours, theirs)
        print(f"llama.cpp {dtype:5s} (KV cache {cache}): {rate:.0f} tokens/s at batch 1; "
              f"greedy tokens equal to zhlm's: {equal}/{compared}, first difference per prompt {first}")


if __name__ == "__main__":
    main()
