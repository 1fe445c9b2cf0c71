"""Retrieval on the demo: held-out idiom-meaning questions, the idiom encyclopedia as the documents.

    python benchmarks/bench_retrieval.py [--results results] [--model results/dpo] [--docs demo_idioms]
        [--task meaning] [--n 100] [--top-k 1,3] [--device auto] [--out FILE.json]

Reads a finished demo run's files under --results, read-only: the documents are the docs
source's clean texts (results/clean/shards/SOURCE/N.parquet: every entry, held-out ones too), the
questions the first --n held-out rows of --task by id (results/split/sft/*/*/eval.parquet), as
the eval asks them. Prints the retriever's recall@1/@5 of the right entry and the character F1 of
the model's greedy answers without and with the passages in the prompt (zhlm.eval.retrieval), for
each --top-k; then what the index costs: building it, reading it back from its cache, one search.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zhlm.eval.retrieval import evaluate_retrieval, source_documents
from zhlm.inference import load
from zhlm.io import read_parquets
from zhlm.retrieval import open_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--model", help="model folder (default: RESULTS/dpo)")
    parser.add_argument("--docs", default="demo_idioms", help="the source whose texts are the documents")
    parser.add_argument("--task", default="meaning")
    parser.add_argument("--n", type=int, default=100, help="questions asked")
    parser.add_argument("--top-k", default="1,3", help="passages per prompt, comma-separated variants")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = Path(args.results)
    doc_files = sorted(p for p in (results / "clean/shards" / args.docs).glob("*.parquet")
                       if p.stem.isdigit())
    documents = source_documents(doc_files)
    rows = read_parquets(sorted(results.glob("split/sft/*/*/eval.parquet"))).to_pylist()
    lm = load(args.model or results / "dpo", args.device)
    print(f"{len(documents)} documents from {len(doc_files)} files; model {lm.name} on {lm.device}, "
          f"{lm.context}-token context")

    out = {"model": str(args.model or results / "dpo"), "variants": {}}
    for k in map(int, args.top_k.split(",")):
        r = evaluate_retrieval(lm.model, lm.tokenizer, documents, rows, task=args.task, top_k=k, max_items=args.n)
        out["variants"][f"top_k={k}"] = r
        f1 = r["char_f1"]
        print(f"top_k={k}: n {r['n']}, recall@1 {r['recall@1']:.3f}, recall@5 {r['recall@5']:.3f}, "
              f"right entry in prompt {r['right_in_prompt']:.3f}, passages in prompt {r['passages_in_prompt']:.2f}, "
              f"reference answer in prompt {r['answer_in_prompt']:.3f}; char F1 without {f1['without']:.3f}, "
              f"with {f1['with']:.3f} (right entry in prompt: {f1['with_right_in_prompt'] or 0:.3f}); "
              f"the best passage itself as the answer {f1['best_passage']:.3f}")
        for s in r["samples"]:
            print(f"  {s['prompt']} passages {s['passages']}\n    reference: {s['reference']}\n"
                  f"    without:   {s['without']}\n    with:      {s['with']}")

    # The cost of the cached index, on the same documents written as one parquet file.
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.parquet"
        pq.write_table(pa.table({"id": [i for i, _ in documents], "text": [t for _, t in documents]}), docs)
        timings = {}
        for name in ("build", "cached"):
            start = time.perf_counter()
            index = open_index(docs, cache_root=Path(tmp) / "cache")
            timings[f"{name}_s"] = time.perf_counter() - start
            assert index.built == (name == "build")
        queries = [r["prompt"] for r in rows if r["id"].endswith(f"#{args.task}")][:args.n]
        start = time.perf_counter()
        for q in queries:
            index.search(q, 5)
        timings["search_ms"] = 1000 * (time.perf_counter() - start) / len(queries)
    out["index"] = {"documents": len(documents), "passages": len(index.passages), **timings}
    print(f"index of {len(index.passages)} passages: built and cached in {timings['build_s']:.1f}s, "
          f"read from the cache in {timings['cached_s']:.2f}s, {timings['search_ms']:.1f} ms per search")
    if args.out:
        Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
