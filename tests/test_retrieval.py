"""Retrieval (zhlm.retrieval): passages, search over a small Chinese document set, the cached index
rebuilt when the documents change, the reference message within its budget and the context, and
--docs through `zhlm serve` (passage ids in plain and streamed responses) and `zhlm chat`."""
import json
import os
import subprocess
import sys

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_chat import Terminal, shown
from test_serve import serving

from zhlm.chat import ChatSession
from zhlm.eval.report import write_report
from zhlm.eval.retrieval import evaluate_retrieval
from zhlm.generate import Sampling, generate
from zhlm.inference import load
from zhlm.retrieval import (
    HEADER,
    Hit,
    Index,
    Passage,
    Retriever,
    augment,
    cache_folder,
    open_index,
    open_retriever,
    passages_of,
    read_documents,
    reference_text,
    split_passages,
    with_references,
)
from zhlm.serve import create_app
from zhlm.tokenizer.chat import encode_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = {
    "长城.txt": "长城是中国古代的军事防御工程。\n它东起山海关，西至嘉峪关，全长两万多公里。",
    "熊猫.md": "# 熊猫\n\n熊猫生活在四川的竹林里，每天吃很多竹子。\n\n熊猫的毛是黑白两色的。",
    "茶/绿茶.txt": "龙井是一种绿茶，产于杭州西湖。\n绿茶不发酵，泡出来的茶汤是绿色的。",
    "高铁.txt": "京沪高铁连接北京和上海，列车最快每小时跑三百五十公里。",
    "春节.txt": "春节是农历新年。\n过年的时候，人们贴春联、放鞭炮、吃饺子、给孩子发红包。",
}
QUERIES = {"熊猫吃什么？": "熊猫.md#1", "长城有多长？": "长城.txt#1", "龙井茶产于哪里？": "茶/绿茶.txt#1",
           "从北京到上海的高铁有多快？": "高铁.txt#1", "过年的时候人们做什么？": "春节.txt#1"}


def write_docs(root, docs=DOCS):
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs")


@pytest.fixture(scope="module")
def lm(model_dir):
    return load(model_dir)


# --- passages and search -----------------------------------------------------------------------

def test_lines_are_joined_into_passages_of_at_most_max_chars():
    text = "第一段。\n\n第二段很短。\n" + "这是一个很长的句子。" * 5 + "\n" + "无标点" * 20
    passages = split_passages(text, max_chars=24)
    sentence = "这是一个很长的句子。"
    # Lines share a passage while they fit (blank lines dropped); a long line is cut at sentence
    # ends, a line without any hard.
    assert passages == ["第一段。\n第二段很短。\n" + sentence, sentence * 2, sentence * 2,
                        "无标点" * 8, "无标点" * 8, "无标点" * 4]


def test_documents_of_a_folder_and_of_a_parquet_file(docs, tmp_path):
    (docs / ".hidden").mkdir()
    (docs / ".hidden/secret.txt").write_text("不该被读到")
    (docs / "image.png").write_bytes(b"\x89PNG")
    assert [doc for doc, _ in read_documents(docs)] == sorted(DOCS)
    long = {"长文.txt": "\n".join(f"第{i}段：" + "内容" * 100 for i in range(3))}
    ids = [p.id for p in passages_of(read_documents(write_docs(tmp_path / "long", long)))]
    assert ids == ["长文.txt#1", "长文.txt#2", "长文.txt#3"]

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["甲的内容", "乙的内容"]}), tmp_path / "with_ids.parquet")
    pq.write_table(pa.table({"text": ["甲的内容", None, "丙的内容"]}), tmp_path / "no_ids.parquet")
    assert read_documents(tmp_path / "with_ids.parquet") == [("a", "甲的内容"), ("b", "乙的内容")]
    assert [p.id for p in passages_of(read_documents(tmp_path / "no_ids.parquet"))] == ["0#1", "2#1"]
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="text"):
        read_documents(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError):
        read_documents(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no text to index"):
        open_index(tmp_path / "empty", cache_root=tmp_path / "cache")


def test_search_finds_the_passage_that_answers_the_question(docs, tmp_path):
    index = open_index(docs, cache_root=tmp_path / "cache")
    for query, want in QUERIES.items():
        hits = index.search(query, 3)
        assert hits[0].passage.id == want, (query, [(h.passage.id, h.score) for h in hits])
        assert all(a.score >= b.score > 0 for a, b in zip(hits, hits[1:]))
    assert index.search("？！", 3) == [] and index.search("量子力学", 3) == []  # no shared word: no hit


# --- the cache -----------------------------------------------------------------------------------

def test_the_index_is_cached_and_rebuilt_when_the_documents_change(docs, tmp_path):
    cache = tmp_path / "cache"
    assert open_index(docs, cache_root=cache).built
    meta = cache_folder(docs, cache) / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again = open_index(docs, cache_root=cache)
    assert not again.built and meta.stat().st_mtime_ns == stamp  # unchanged: read back, not rebuilt
    assert again.search("熊猫吃什么？", 1)[0].passage.id == "熊猫.md#1"

    (docs / "故宫.txt").write_text("故宫位于北京中轴线的中心，是明清两代的皇家宫殿。", encoding="utf-8")  # added
    index = open_index(docs, cache_root=cache)
    assert index.built and index.search("故宫在哪里？", 1)[0].passage.id == "故宫.txt#1"
    assert not open_index(docs, cache_root=cache).built

    # Edited to the same size and given back its old mtime: the content is what counts.
    path = docs / "高铁.txt"
    before = path.stat()
    path.write_text(DOCS["高铁.txt"].replace("北京", "天津"), encoding="utf-8")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    index = open_index(docs, cache_root=cache)
    assert index.built and "天津" in index.search("高铁", 1)[0].passage.text

    (docs / "熊猫.md").unlink()  # removed
    index = open_index(docs, cache_root=cache)
    assert index.built and all(not p.id.startswith("熊猫") for p in index.passages)
    assert not open_index(docs, cache_root=cache).built


def test_a_damaged_cache_is_rebuilt_and_the_default_cache_is_under_xdg_cache_home(docs, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert open_index(docs).built
    folder = cache_folder(docs)
    assert folder.parent == tmp_path / "xdg/zhlm/retrieval" and (folder / "meta.json").is_file()
    (folder / "meta.json").write_text("{not json")
    assert open_index(docs).built and not open_index(docs).built


# --- the prompt ----------------------------------------------------------------------------------

def hits_of(*texts):
    return [Hit(Passage(f"d{i}#1", f"d{i}", t), 10.0 - i) for i, t in enumerate(texts)]


def test_the_reference_message_holds_the_passages_within_its_budget():
    hits = hits_of("甲" * 40, "乙" * 40, "丙" * 40)
    text, used = reference_text(hits, 1000)
    assert text == f"{HEADER}\n[d0#1] {'甲' * 40}\n[d1#1] {'乙' * 40}\n[d2#1] {'丙' * 40}" and used == hits
    for budget in range(30, 160, 7):
        text, used = reference_text(hits, budget)
        assert text is None or len(text) <= budget
        if text:  # best first; only the last one used may be cut
            assert used == hits[:len(used)] and text.count("…") <= 1
            assert all(h.passage.text in text for h in used[:-1])
    text, used = reference_text(hits, 60)  # room for the first whole and nothing of the second
    assert used == hits[:1] and "…" not in text
    text, used = reference_text(hits, 90)  # the second cut
    assert used == hits[:2] and text.endswith("…")
    assert reference_text(hits, 20) == (None, [])


def test_the_passages_join_the_system_message():
    question = [{"role": "user", "content": "问题"}]
    assert with_references(question, "参考资料：x") == [{"role": "system", "content": "参考资料：x"}, *question]
    system = [{"role": "system", "content": "你是助手。"}, *question]
    assert with_references(system, "参考资料：x")[0]["content"] == "你是助手。\n\n参考资料：x"
    assert with_references(system, None) == system


def test_augment_leaves_the_answer_its_room_in_the_context(docs, tmp_path, lm):
    index = open_index(docs, cache_root=tmp_path / "cache")
    question = [{"role": "user", "content": "过年的时候人们做什么？"}]
    alone = len(encode_prompt(lm.tokenizer, question))
    sizes = []
    for answer in (8, 40, 70, 90, lm.context - alone):
        messages, used = augment(question, index, lm.tokenizer, lm.context, answer, top_k=3)
        assert len(encode_prompt(lm.tokenizer, messages)) + answer <= lm.context
        if used:
            assert used[0].passage.id == "春节.txt#1" and f"[{used[0].passage.id}]" in messages[0]["content"]
        else:
            assert messages == question
        sizes.append(len(messages[0]["content"]) if used else 0)
    assert sizes[0] > 0 and sizes[-1] == 0 and sizes == sorted(sizes, reverse=True)


# --- the eval ------------------------------------------------------------------------------------

def test_the_retrieval_eval_scores_recall_and_answers_with_and_without(lm, tmp_path):
    meanings = {"画蛇添足": "比喻做了多余的事", "守株待兔": "比喻死守经验不知变通", "亡羊补牢": "出了问题以后补救"}
    documents = [(f"idiom:{w}", f"{w}是一个成语，意思是：{m}") for w, m in meanings.items()]
    rows = [{"id": f"idiom:{w}#meaning", "prompt": f"成语“{w}”是什么意思？", "response": "比喻"}
            for w in ("画蛇添足", "守株待兔", "对牛弹琴")]
    rows.append({"id": "idiom:画蛇添足#pinyin", "prompt": "怎么读？", "response": "huà"})
    r = evaluate_retrieval(lm.model, lm.tokenizer, documents, rows, max_new_tokens=8, samples=2)
    assert (r["n"], r["documents"], r["passages"], r["no_document"]) == (3, 3, 3, 1)
    assert r["recall@1"] == pytest.approx(2 / 3) and r["recall@5"] == pytest.approx(2 / 3)
    assert all(f is None or 0 <= f <= 1 for f in r["char_f1"].values()) and len(r["samples"]) == 2
    assert r["char_f1"]["best_passage"] > 0  # the passages hold the reference "比喻"
    out = tmp_path / "report.md"
    write_report({}, out, retrieval={**r, "source": "demo_idioms"})
    assert "## Retrieval" in out.read_text() and "recall@1 | 0.667" in out.read_text()


# --- serve and chat with --docs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    return open_retriever(write_docs(root / "docs"), top_k=2, cache_root=root / "cache")


@pytest.fixture(scope="module")
def base_url(model_dir, retriever):
    with serving(create_app(model_dir, retriever=retriever)) as url:
        yield url


def test_serve_puts_the_passages_in_the_prompt_and_returns_their_ids(base_url, lm, retriever):
    messages = [{"role": "user", "content": "熊猫吃什么？"}]
    augmented, used = retriever.augment(messages, lm.tokenizer, lm.context, 12)
    assert used and used[0].passage.id == "熊猫.md#1"
    ids = generate(lm.model, [encode_prompt(lm.tokenizer, augmented)], Sampling(max_new_tokens=12),
                   stop_ids=lm.stop_ids)[0]
    body = {"model": "tiny", "messages": messages, "max_tokens": 12}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        plain = http.post("/v1/chat/completions", json=body).json()
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
        nothing = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "？"}]})
    expected = [{"id": h.passage.id, "score": round(h.score, 4)} for h in used]
    assert plain["zhlm_passages"] == expected
    assert plain["choices"][0]["message"]["content"] == lm.tokenizer.decode(ids)
    assert plain["usage"]["prompt_tokens"] == len(encode_prompt(lm.tokenizer, augmented))
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["zhlm_passages"] == expected and all("zhlm_passages" not in c for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == lm.tokenizer.decode(ids)
    assert nothing.status_code == 200 and nothing.json()["zhlm_passages"] == []


def test_chat_with_docs_in_a_terminal(model_dir, lm, tmp_path, monkeypatch):
    docs = write_docs(tmp_path / "docs")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    term = Terminal(str(model_dir), "--docs", str(docs), "--docs-top-k", "2", "--max-new-tokens", "10",
                    "--temperature", "0")
    try:
        assert b"5 passages of" in term.read_until(b">>> ")
        retriever = open_retriever(docs, top_k=2)
        assert not retriever.index.built  # the chat cached the index
        expected = ChatSession(lm, Sampling(max_new_tokens=10), retriever=retriever)
        answer = "".join(expected.reply("春节有什么习俗？"))
        assert expected.passages and expected.passages[0].passage.id == "春节.txt#1"
        out = term.type("春节有什么习俗？")
        assert f"(passages: 春节.txt#1 {expected.passages[0].score:.2f}".encode() in out
        assert shown(answer) in out
        os.write(term.fd, b"/quit\n")
        assert term.proc.wait(timeout=20) == 0
    finally:
        term.close()
    run = subprocess.run([sys.executable, "-m", "zhlm.cli", "chat", str(model_dir), "--docs", str(tmp_path / "none")],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert run.returncode == 2 and "no such folder" in run.stderr


def test_bad_docs_settings_are_refused():
    with pytest.raises(ValueError, match="top-k"):
        Retriever(Index([], None), top_k=0)
    with pytest.raises(ValueError, match="chars"):
        Retriever(Index([], None), max_chars=10)
