"""Throughput and latency of `zhlm serve` under concurrent chat requests.

    python benchmarks/bench_serve.py [MODEL_DIR (default results/dpo)] [--requests 64 --concurrency 16
                                      --max-tokens 64 --max-batch 16 --threads N]

Starts `zhlm serve` on 127.0.0.1 (a free port) in a subprocess, sends N greedy
streaming requests over C connections at a time, and prints requests/s,
generated tokens/s, and p50/p95 of the time to the first token and of the whole
request. Everything is bounded by --timeout; the server is stopped at the end.
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

QUESTIONS = ["“画蛇添足”是什么意思？", "“一心一意”怎么读？", "“守株待兔”出自哪里？", "用“亡羊补牢”造一个句子。",
             "请判断这条评论的情感倾向：质量很差，再也不买了。", "请判断这条评论的情感倾向：物流很快，包装完好。",
             "请给这句话分词：今天天气很好。", "“对牛弹琴”是什么意思？", "“刻舟求剑”怎么读？",
             "请判断这条评论的情感倾向：房间干净，服务周到。", "“胸有成竹”出自哪里？",
             "请给这句话分词：我们去北京看长城。",
             "用“井底之蛙”造一个句子。", "“半途而废”是什么意思？", "请判断这条评论的情感倾向：电池不耐用，失望。",
             "“卧薪尝胆”怎么读？"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one(client: httpx.AsyncClient, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, completion tokens) of one streamed request."""
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


async def load(base_url: str, requests: int, concurrency: int, max_tokens: int, timeout: float):
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def bounded(i):
            async with limit:
                return await one(client, QUESTIONS[i % len(QUESTIONS)], max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return results, time.perf_counter() - start


def wait_healthy(base_url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("the server did not become healthy in time")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default="results/dpo")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the server (default: torch's choice)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the whole run")
    args = ap.parse_args()

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ZHLM_LOG_LEVEL": "warning"}
    env.pop("ZHLM_API_KEY", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen([sys.executable, "-m", "zhlm.cli", "serve", args.model_dir, "--port", str(port),
                               "--device", args.device, "--max-batch", str(args.max_batch)], env=env)
    try:
        deadline = time.time() + args.timeout
        wait_healthy(base_url, server, timeout=min(120, args.timeout))
        asyncio.run(load(base_url, 2, 2, 4, timeout=60))  # warm-up
        left = max(1.0, deadline - time.time())
        results, seconds = asyncio.run(asyncio.wait_for(
            load(base_url, args.requests, args.concurrency, args.max_tokens, timeout=left), left))
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    firsts, totals, tokens = zip(*results)
    print(f"{args.model_dir}: {args.requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
          f"max_batch {args.max_batch}, greedy")
    print(f"  {args.requests / seconds:8.2f} requests/s   {sum(tokens) / seconds:8.1f} generated tokens/s "
          f"({sum(tokens)} tokens in {seconds:.1f} s)")
    print(f"  latency     p50 {statistics.median(totals):6.2f} s   p95 {percentile(totals, 0.95):6.2f} s")
    print(f"  first token p50 {statistics.median(firsts):6.2f} s   p95 {percentile(firsts, 0.95):6.2f} s")


if __name__ == "__main__":
    main()
