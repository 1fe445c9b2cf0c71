"""The retrieval eval: held-out questions answered with and without passages of the documents.

A question is a held-out task row `ITEM#task`; its right document is the one whose id is ITEM
(in the demo, `idiom:画蛇添足#meaning` asks about the encyclopedia entry `idiom:画蛇添足`). It
reports the retriever's recall@k of the right document, and the character F1 of the model's
greedy answers (zhlm.eval.tasks.answer_prompts) without retrieval and with the best passages in
the system message, fitted to the context exactly as `zhlm chat --docs` and `zhlm serve --docs`
fit them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from tokenizers import Tokenizer

from zhlm.eval.metrics import char_f1
from zhlm.eval.tasks import answer_prompts, select_rows
from zhlm.io import read_parquets
from zhlm.retrieval import TOP_K, Index, fit_references, passages_of
from zhlm.tokenizer.chat import encode_prompt, messages_of

RECALL_AT = (1, 5)


@dataclass
class RetrievalEvalConfig:
    """The schema's `retrieval` settings, with its defaults (a test holds the two together)."""
    docs: str | None = None  # a pretrain source whose texts are the documents; None: no retrieval eval
    task: str = "meaning"    # the held-out task whose questions are asked
    top_k: int = TOP_K       # passages searched per question and put into the prompt as far as they fit


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def evaluate_retrieval(model, tokenizer: Tokenizer, documents: list[tuple[str, str]], rows: list[dict], *,
                       task: str = "meaning", top_k: int = TOP_K, max_items: int | None = 100,
                       max_new_tokens: int = 64, batch_size: int = 16, samples: int = 3) -> dict:
    """Recall@k of the right document and the answers' character F1 with and without retrieval.

    documents: (id, text); rows: held-out sft rows (the first `max_items` of `task` by id are asked).
    """
    start = time.time()
    index = Index.build(passages_of(documents))
    build_s = time.time() - start
    questions = select_rows(rows, max_items).get(task, [])
    conversations = [messages_of({k: v for k, v in r.items() if k != "response"}) for r in questions]
    wanted = [r["id"].partition("#")[0] for r in questions]
    known = {doc for doc, _ in documents}
    search_k = max(*RECALL_AT, top_k)
    hits = [index.search(r["prompt"], search_k) for r in questions]

    # The passages in the prompt: as many of the best top_k as leave the answer its room.
    context = model.config.max_position_embeddings
    def fits(messages):
        return len(encode_prompt(tokenizer, messages)) + max_new_tokens <= context
    fitted = [fit_references(c, h[:top_k], fits) for c, h in zip(conversations, hits)]

    plain = answer_prompts(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rag = answer_prompts(model, tokenizer, [m for m, _ in fitted], max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    refs = [r["response"] for r in questions]
    f1_plain = [char_f1(a or "", ref) for a, ref in zip(plain, refs)]
    f1_rag = [char_f1(a or "", ref) for a, ref in zip(rag, refs)]
    in_prompt = [any(h.passage.doc == w for h in used) for (_, used), w in zip(fitted, wanted)]
    reference_text = [m[0]["content"] if used else "" for m, used in fitted]
    return {
        "task": task, "n": len(questions), "documents": len(documents), "passages": len(index.passages),
        "index_seconds": round(build_s, 2), "top_k": top_k,
        # Questions whose right document is not among the documents count as misses.
        "no_document": sum(w not in known for w in wanted),
        **{f"recall@{k}": _mean(any(h.passage.doc == w for h in hs[:k]) for hs, w in zip(hits, wanted))
           for k in RECALL_AT},
        "right_in_prompt": _mean(in_prompt),
        "answer_in_prompt": _mean(ref in text for ref, text in zip(refs, reference_text)),
        "passages_in_prompt": _mean(len(used) for _, used in fitted),
        "char_f1": {"without": _mean(f1_plain), "with": _mean(f1_rag),
                    "with_right_in_prompt": _mean(f for f, i in zip(f1_rag, in_prompt) if i),
                    # No model: the best passage itself as the answer, what retrieval alone gives.
                    "best_passage": _mean(char_f1(h[0].passage.text if h else "", ref) for h, ref in zip(hits, refs))},
        "unanswered": {"without": sum(a is None for a in plain), "with": sum(a is None for a in rag)},
        "samples": [{"id": r["id"], "prompt": r["prompt"], "reference": ref, "passages": [h.passage.id for h in used],
                     "without": a, "with": b}
                    for r, ref, (_, used), a, b in list(zip(questions, refs, fitted, plain, rag))[:samples]],
    }


def source_documents(paths) -> list[tuple[str, str]]:
    """(id, text) of the rows of parquet files with `id` and `text` columns (a source's texts)."""
    table = read_parquets(paths)
    return [(i, t) for i, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist()) if t]
