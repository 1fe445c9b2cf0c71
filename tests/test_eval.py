"""Eval: metrics, looping answers, bits per character, preference and implicit-reward accuracy, multiple choice,
idiom choice set, report and summary."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zhlm.data import demo
from zhlm.data.split import item_key, split_point
from zhlm.eval import (
    char_f1,
    choice_accuracy,
    evaluate_bpc,
    evaluate_model,
    evaluate_tasks,
    exact_match,
    implicit_reward_accuracy,
    loop_unit,
    looping_share,
    normalize_answer,
    paired_difference,
    polarity_label,
    preference_accuracy,
    read_choice_csv,
    segmentation_f1,
    summary,
    task_of,
    unigram_bpc,
    write_report,
)
from zhlm.eval.choice import LETTERS, answer_logps, choice_scores, letter_prompt
from zhlm.eval.report import delta_table
from zhlm.eval.run import _text_budget
from zhlm.eval.tasks import score_task
from zhlm.io import write_json, write_parquet
from zhlm.model import LlamaForCausalLM, ModelConfig, save_model
from zhlm.tokenizer.bpe import build_from_texts, save_tokenizer
from zhlm.tokenizer.chat import EOT, IGNORE, encode_chat
from zhlm.tokenizer.conversations import tokenize_dpo
from zhlm.train.dpo import open_pairs, reward_metrics, with_reference

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "ceval_sample.csv"

TEXTS = [
    "人民日报报道，北京的天气今天很好。", "这家酒店的服务质量很好，下次还会再来。",
    "手机用了三天就坏了，非常失望。", "画蛇添足比喻做了多余的事，反而不恰当。",
    "中国的首都是北京。", "一年有四个季节：春夏秋冬。", "长江最终流入东海。",
] * 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is much faster than several fighting over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    rows = read_choice_csv(FIXTURE)
    texts = TEXTS + [" ".join(r[k] for k in ("question", *LETTERS)) for r in rows]
    tok, _, _ = build_from_texts(texts, 400, min_frequency=1)
    return tok


@pytest.fixture(scope="session")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


# --- metrics ---------------------------------------------------------------------

def test_normalize_and_exact_match():
    assert normalize_answer("  ＡＢ  c\n\t d ") == "ab c d"
    assert exact_match("Zhāo  sān mù sì", "zhāo sān mù sì") == 1.0  # whitespace and case only
    assert exact_match("zhao san mu si", "zhāo sān mù sì") == 0.0    # tone marks count
    assert exact_match("北京。", "北京") == 0.0


def test_char_f1():
    assert char_f1("北京市", "北京") == pytest.approx(0.8)          # p = 2/3, r = 1
    assert char_f1("北 京！", "北京") == 1.0                         # spaces, punctuation ignored
    assert char_f1("天天", "天") == pytest.approx(2 / 3)             # multiset: one 天 matches
    assert char_f1("上海", "北京") == 0.0
    assert char_f1("", "北京") == 0.0
    assert char_f1("。", "") == 1.0


def test_polarity_label():
    assert polarity_label("这条评论是负面的，不是正面") == "负面"
    assert polarity_label("正面") == "正面"
    assert polarity_label("不知道") is None


def test_segmentation_f1_by_hand():
    gold = "我 爱 北京 天安门"  # spans (0,1) (1,2) (2,4) (4,7)
    assert segmentation_f1(gold, gold) == (1.0, 1.0, 1.0)
    p, r, f = segmentation_f1("我 爱北京 天安门", gold)  # (0,1) (1,4) (4,7): 2 right
    assert (p, r, f) == (pytest.approx(2 / 3), 0.5, pytest.approx(4 / 7))
    # A changed character: the word at the same offsets no longer counts.
    assert segmentation_f1("我 恨 北京 天安门", gold) == (0.75, 0.75, 0.75)
    # A dropped character shifts every later word.
    assert segmentation_f1("我 北京 天安门", gold)[0] == pytest.approx(1 / 3)
    assert segmentation_f1("", gold) == (0.0, 0.0, 0.0)


def test_task_of():
    assert task_of("idiom:画蛇添足#pinyin") == "pinyin"
    assert task_of("review:ab12#polarity") == "polarity"
    assert task_of("news:12#seg3") == "segmentation"
    assert [task_of(f"idiom:X#{t}") for t in ("meaning", "origin", "example")] == ["meaning", "origin", "example"]
    assert task_of("belle:7") == task_of("news:1#segment") == "other"


def test_score_task_by_hand():
    items = [{"answer": "正面", "reference": "正面"}, {"answer": "我觉得是负面", "reference": "正面"},
             {"answer": "嗯", "reference": "负面"}, {"answer": "负面。", "reference": "负面"}]
    assert score_task("polarity", items) == {"n": 4, "looping": 0.0, "accuracy": 0.5, "no_label": 0.25}
    seg = [{"answer": "我 爱 北京", "reference": "我 爱 北京"}, {"answer": "天安门", "reference": "天 安门"}]
    out = score_task("segmentation", seg)  # micro: 3 right of 4 predicted, 5 gold
    assert (out["precision"], out["recall"], out["exact_match"]) == (0.75, 0.6, 0.5)


# --- looping answers -------------------------------------------------------------

def test_loop_unit_finds_loops():
    assert loop_unit("你" * 20) == "你"
    assert loop_unit("有此" * 10) == "有此"
    assert loop_unit("王 " * 10) == "王"                       # whitespace ignored
    assert loop_unit("我喜欢这本书。" * 3) == "我喜欢这本书。"  # a sentence, three times
    # A loop after a normal start, cut in the middle of a unit at the token limit.
    assert loop_unit("这家酒店的服务很好，" + "非常好" * 5 + "非") == "非常好"
    assert loop_unit("答案是：" + "对" * 10 + "。谢谢。") == "对"  # a loop that ends
    assert loop_unit("对" * 10) == "对"                         # the shortest loop that counts


def test_loop_unit_leaves_natural_repeats():
    for text in ("谢谢谢谢你的帮助。", "哈哈哈哈哈，太好笑了！", "天天向上，好好学习。",
                 "他说：“好好好，我知道了。”", "春天来了，春天来了，花都开了。", "我 爱 北京 天安门",
                 "一年有四个季节：春夏秋冬。春天温暖，夏天炎热，秋天凉爽，冬天寒冷。", "zhāo sān mù sì", "", None):
        assert loop_unit(text) is None, text
    assert loop_unit("对" * 9) is None                              # too short
    assert loop_unit("有此" * 4) is None                            # 8 characters
    assert loop_unit("甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午" * 3) is None   # a unit longer than 16


def test_looping_share():
    assert looping_share(["你" * 20, "北京。", "有此" * 10, "谢谢谢谢"]) == 0.5
    assert looping_share([]) is None


def test_evaluate_tasks_runs_and_limits(model, tokenizer):
    rows = [{"id": f"idiom:{w}#{t}", "prompt": f"成语“{w}”{t}？", "response": "画蛇添足"}
            for w in ("甲", "乙", "丙") for t in ("pinyin", "meaning")]
    rows.append({"id": "review:1#polarity", "prompt": "判断：很好", "response": "正面", "system": None,
                 "history": None})
    metrics, answers = evaluate_tasks(model, tokenizer, rows, max_new_tokens=4, batch_size=2, per_task_limit=2)
    assert {t: m["n"] for t, m in metrics.items()} == {"meaning": 2, "pinyin": 2, "polarity": 1}
    # the first two by the split's hash of the item, the same items for both tasks
    first = sorted("甲乙丙", key=lambda w: split_point(f"idiom:{w}"))[:2]
    assert [a["id"] for a in answers if a["task"] == "pinyin"] == [f"idiom:{w}#pinyin" for w in first]
    assert [a["id"] for a in answers if a["task"] == "meaning"] == [f"idiom:{w}#meaning" for w in first]
    again, answers2 = evaluate_tasks(model, tokenizer, rows, max_new_tokens=4, batch_size=3, per_task_limit=2)
    assert again == metrics and [a["answer"] for a in answers2] == [a["answer"] for a in answers]


# --- bits per character ----------------------------------------------------------

def test_unigram_bpc_by_hand():
    assert unigram_bpc(["ab"], ["b"]) == pytest.approx(math.log2(3))  # p(b) = p(end) = 2/6
    # train a a b <end>: 4 symbols; vocabulary {a, b, c, <end>}: total 4 + 4 = 8
    expected = -(math.log2(3 / 8) + math.log2(1 / 8) + math.log2(2 / 8)) / 3
    assert unigram_bpc(["aab"], ["ac"]) == pytest.approx(expected)


def test_bpc_equals_direct_cross_entropy(model, tokenizer):
    texts = TEXTS[:5]
    seq_len = 16
    eot = tokenizer.token_to_id(EOT)
    stream = [eot]
    for t in texts:
        stream += tokenizer.encode(t, add_special_tokens=False).ids + [eot]
    stream = torch.tensor(stream)
    nats = 0.0
    for start in range(0, len(stream) - 1, seq_len):
        window = stream[start:start + seq_len + 1]
        with torch.no_grad():
            logits = model(window[None, :-1])[0]
        nats += F.cross_entropy(logits.float(), window[1:], reduction="sum").item()
    chars = sum(len(t) for t in texts) + len(texts)
    out = evaluate_bpc(model, tokenizer, texts + [""], seq_len=seq_len, batch_size=3)
    assert out["tokens"] == len(stream) - 1 and out["chars"] == chars
    assert out["nats"] == pytest.approx(nats, rel=1e-5)
    assert out["bpc"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)


# --- preference accuracy ---------------------------------------------------------

def test_preference_accuracy_flips_when_swapped(model, tokenizer):
    pairs = [{"prompt": "中国的首都是哪里？", "chosen": "北京。", "rejected": "我不知道这个问题的答案。"},
             {"prompt": "评论：很好", "chosen": "正面", "rejected": "负面"},
             {"prompt": "一年有几个季节？", "chosen": "四个季节：春夏秋冬。", "rejected": "三个"}]
    out = preference_accuracy(model, tokenizer, pairs, batch_size=2)
    swapped = preference_accuracy(model, tokenizer, [{**p, "chosen": p["rejected"], "rejected": p["chosen"]}
                                                     for p in pairs])
    assert out["n"] == 3
    assert swapped["accuracy"] == pytest.approx(1 - out["accuracy"])
    assert swapped["mean_margin"] == pytest.approx(-out["mean_margin"], abs=1e-4)


# --- DPO implicit reward ---------------------------------------------------------

PAIRS = [{"id": "p1", "prompt": "中国的首都是哪里？", "chosen": "北京。", "rejected": "我不知道这个问题的答案。"},
         {"id": "p2", "prompt": "评论：很好", "chosen": "正面", "rejected": "负面"},
         {"id": "p3", "prompt": "一年有几个季节？", "chosen": "四个季节：春夏秋冬。", "rejected": "三个"},
         {"id": "p4", "prompt": "长江流入哪里？", "chosen": "长江最终流入东海。", "rejected": "流入黄河",
          "system": "你是一个地理老师。",
          "history": json.dumps([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
                                ensure_ascii=False)}]


def other_model(tokenizer, seed):
    """A second random model of the fixture model's shape: a policy that differs from the reference."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def test_implicit_reward_of_the_reference_itself_is_zero(model, tokenizer):
    out = implicit_reward_accuracy(model, model, tokenizer, PAIRS, beta=0.1, batch_size=3)
    assert out["n"] == 4 and out["beta"] == 0.1
    assert out["accuracy"] == 0.0 and out["mean_margin"] == 0.0  # a tie is not a win


def test_implicit_reward_of_a_policy_made_to_prefer_chosen(model, tokenizer):
    """Tokens only the chosen answers have, made likely: every chosen answer gains, every rejected one loses."""
    def ids(text):
        return set(tokenizer.encode(text, add_special_tokens=False).ids)

    rejected = set().union(*(ids(p["rejected"]) for p in PAIRS))
    chosen_only = set().union(*(ids(p["chosen"]) for p in PAIRS)) - rejected
    assert all(ids(p["chosen"]) & chosen_only for p in PAIRS)
    policy = Rigged(model, chosen_only, bonus=10.0)
    out = implicit_reward_accuracy(policy, model, tokenizer, PAIRS, beta=0.1)
    assert out["accuracy"] == 1.0 and out["mean_margin"] > 0
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in PAIRS]
    back = implicit_reward_accuracy(policy, model, tokenizer, swapped, beta=0.1)
    assert back["accuracy"] == 0.0 and back["mean_margin"] == pytest.approx(-out["mean_margin"])
    # β scales the margin and leaves the accuracy.
    assert implicit_reward_accuracy(policy, model, tokenizer, PAIRS, beta=0.3)["mean_margin"] == pytest.approx(
        3 * out["mean_margin"])


@pytest.mark.parametrize("seq_len", [None, 32], ids=["whole", "cut"])
def test_implicit_reward_equals_dpo_training_own(model, tokenizer, tmp_path, seq_len):
    """The eval encodes, cuts and scores the pairs as DPO does: tokenize_dpo's token files, DPO's
    reference log-probs and its held-out reward metrics give the same accuracy and margin.
    With seq_len 32 most answers are cut part way, and p4's, behind its system prompt and history, entirely."""
    save_tokenizer(tokenizer, tmp_path / "tokenizer")
    rows = [{"source": "test", "system": None, "history": None, **p, "split": "eval"} for p in PAIRS]
    write_parquet(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    meta = tokenize_dpo([tmp_path / "pairs.parquet"], [], tmp_path / "tokenizer/tokenizer.json", tmp_path / "tokens")
    assert meta["eval"]["pairs"] == 4
    policy, beta = other_model(tokenizer, seed=1), 0.5
    max_len = None if seq_len is None else seq_len + 1
    pairs = open_pairs(tmp_path / "tokens", "eval", max_len or 10_000, meta["dtype"])
    pad = model.config.pad_token_id
    dpo = reward_metrics(policy, with_reference(model, pairs, pad), beta, pad)
    ours = implicit_reward_accuracy(policy, model, tokenizer, PAIRS, beta=beta, max_len=max_len)
    assert ours["accuracy"] == dpo["val_reward_accuracy"]
    assert ours["mean_margin"] == pytest.approx(dpo["val_reward_margin"], abs=1e-5)
    assert 0 < ours["accuracy"] < 1  # the policy wins some pairs, not all: the pairs are told apart


# --- multiple choice -------------------------------------------------------------

class Rigged(nn.Module):
    """A model that adds `bonus` to the logits of some tokens: it makes them most likely."""

    def __init__(self, model, tokens, bonus=50.0):
        super().__init__()
        self.inner, self.tokens, self.bonus, self.config = model, list(tokens), bonus, model.config

    def forward(self, input_ids):
        logits = self.inner(input_ids).clone()
        logits[..., self.tokens] += self.bonus
        return logits


def test_fixture_reads_in_ceval_layout():
    rows = read_choice_csv(FIXTURE)
    assert len(rows) == 8
    assert list(rows[0]) == ["id", "question", "A", "B", "C", "D", "answer"]
    assert all(r["answer"] in LETTERS for r in rows)


def test_letter_scores_equal_direct_logprob(model, tokenizer):
    row = read_choice_csv(FIXTURE)[0]
    scores = choice_scores(model, tokenizer, [row])[0]
    for letter, score in zip(LETTERS, scores["letter_scores"]):
        ids, labels = encode_chat(tokenizer, [{"role": "user", "content": letter_prompt(row)},
                                              {"role": "assistant", "content": letter}])
        letter_ids = tokenizer.encode(letter, add_special_tokens=False).ids
        # the letter's tokens sit just before the closing <|im_end|>
        end = max(i for i, t in enumerate(labels) if t != IGNORE)
        assert ids[end - len(letter_ids):end] == letter_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        direct = sum(logp[i - 1, ids[i]].item() for i in range(end - len(letter_ids), end))
        assert score == pytest.approx(direct, abs=1e-4)
    # The one-pass letter scoring agrees with scoring each letter as a whole answer.
    whole = answer_logps(model, tokenizer, [(letter_prompt(row), x) for x in LETTERS])
    assert scores["letter_scores"] == pytest.approx([lp for lp, _ in whole], abs=1e-4)


def test_choice_picks_the_rigged_option(model, tokenizer):
    rows = read_choice_csv(FIXTURE)
    c_tokens = tokenizer.encode("C", add_special_tokens=False).ids
    out = choice_accuracy(Rigged(model, c_tokens), tokenizer, rows, batch_size=5)
    assert out["n"] == 8 and out["chance"] == 0.25
    assert out["letter_accuracy"] == sum(r["answer"] == "C" for r in rows) / 8  # always picks C
    # Cloze: make every token of one option's text likely; that option wins.
    row = rows[3]  # 鲸鱼 / 鲨鱼 / 金鱼 / 海龟, answer A
    scored = choice_scores(Rigged(model, tokenizer.encode(row["A"], add_special_tokens=False).ids), tokenizer, [row])
    assert scored[0]["cloze_pick"] == "A"
    scored = choice_scores(Rigged(model, tokenizer.encode(row["D"], add_special_tokens=False).ids), tokenizer, [row])
    assert scored[0]["cloze_pick"] == "D"


def test_idiom_choice_rows():
    rows = demo.build("idiom_choice")
    assert demo.DEMO_KINDS["idiom_choice"] == "choice"
    meaning = {r["word"]: r["explanation"] for r in demo._idiom_rows()}
    for row in rows[::50]:
        word = item_key(row["id"]).removeprefix("idiom:")
        assert row["id"].endswith("#choice") and word in row["question"]
        options = [row[x] for x in LETTERS]
        assert len(set(options)) == 4
        assert [x for x in LETTERS if row[x] == meaning[word]] == [row["answer"]]
    assert demo.idiom_choice()[:200] == rows[:200]  # deterministic
    assert len({r["answer"] for r in rows[:200]}) == 4


# --- whole model and report ------------------------------------------------------

def test_evaluate_model_and_report(model, tokenizer, tmp_path):
    save_model(model, tmp_path / "sft")
    save_tokenizer(tokenizer, tmp_path / "sft")
    rows = [{"id": "review:1#polarity", "prompt": "判断：很好", "response": "正面"},
            {"id": "news:1#seg0", "prompt": "请分词：\n我爱北京", "response": "我 爱 北京"}]
    pairs = [{"id": "p1", "prompt": "你好", "chosen": "你好！", "rejected": "嗯"}]
    settings = {"max_new_tokens": 4, "sample_max_new_tokens": 4, "max_bpc_chars": 60, "batch_size": 8}
    results = {}
    for stage in ("pretrain", "sft", "dpo"):
        # "dpo" here is the same model with itself as the reference.
        results[stage] = evaluate_model(
            tmp_path / "sft", stage=stage, val_texts=TEXTS, train_texts_for_baseline=TEXTS[::-1], task_rows=rows,
            pairs=pairs, choice_sets={"ceval_sample": read_choice_csv(FIXTURE)}, seq_len=32, settings=settings,
            reference_dir=tmp_path / "sft" if stage == "dpo" else None, dpo_settings={"beta": 0.2, "seq_len": 64})
    json.dumps(results)
    assert "tasks" not in results["pretrain"] and results["pretrain"]["bpc"]["chars"] <= 60 + 5
    assert "looping" not in results["pretrain"]
    sft, dpo = results["sft"], results["dpo"]
    assert set(sft["tasks"]) == {"polarity", "segmentation"} and sft["choice"]["ceval_sample"]["n"] == 8
    assert len(sft["samples"]) == 6 + 2 and sft["preference"]["n"] == 1
    assert {k: v["n"] for k, v in sft["looping"].items()} == {"tasks": 2, "samples": 8, "all": 10}
    assert "implicit_reward" not in sft and dpo["preference"] == sft["preference"]
    assert dpo["implicit_reward"] == {"n": 1, "beta": 0.2, "accuracy": 0.0, "mean_margin": 0.0}
    assert summary(results)["dpo.implicit_reward.accuracy"] == 0.0

    plot = tmp_path / "sft" / "loss.png"
    plot.write_bytes(b"png")
    out = tmp_path / "eval" / "report.md"
    write_report(results, out, loss_plots={"sft": plot})
    text = out.read_text(encoding="utf-8")
    for needle in ("pretrain", "sft", "unigram baseline", f"{sft['bpc']['bpc']:.3f}", "segmentation",
                   "ceval_sample", "你好，请介绍一下你自己。", "](../sft/loss.png)", "## Stage by stage",
                   "## Looping answers", "implicit-reward acc."):
        assert needle in text


RESULTS = {  # the parts of three stages' eval results that the summary reads
    "pretrain": {"bpc": {"bpc": 6.06, "tokens": 100, "chars": 200}},
    "sft": {"bpc": {"bpc": 6.87, "tokens": 100, "chars": 200},
            "tasks": {"polarity": {"n": 10, "accuracy": 0.7, "no_label": 0.1, "looping": 0.0},
                      "origin": {"n": 10, "char_f1": 0.093, "exact_match": 0.0, "looping": 0.1}},
            "looping": {"all": {"n": 28, "share": 0.05}, "tasks": {"n": 20, "share": 0.05},
                        "samples": {"n": 8, "share": 0.0}},
            "preference": {"n": 5, "accuracy": 0.24, "mean_margin": -3.0},
            "choice": {"idioms": {"n": 8, "letter_accuracy": 0.25, "cloze_accuracy": 0.5}}},
    "dpo": {"bpc": {"bpc": 6.9, "tokens": 100, "chars": 200},
            "tasks": {"polarity": {"n": 10, "accuracy": 0.6, "no_label": 0.2, "looping": 0.3},
                      "origin": {"n": 10, "char_f1": 0.045, "exact_match": 0.0, "looping": 0.5}},
            "looping": {"all": {"n": 28, "share": 0.5}, "tasks": {"n": 20, "share": 0.4},
                        "samples": {"n": 8, "share": 0.75}},
            "preference": {"n": 5, "accuracy": 0.35, "mean_margin": -1.0},
            "implicit_reward": {"n": 5, "beta": 0.1, "accuracy": 0.8, "mean_margin": 0.25},
            "choice": {"idioms": {"n": 8, "letter_accuracy": 0.375, "cloze_accuracy": 0.5}}},
}


def test_summary_is_flat_headline_numbers():
    flat = summary(RESULTS)
    assert json.loads(json.dumps(flat)) == flat
    assert {k: v for k, v in flat.items() if not k.startswith("dpo.")} == {
        "pretrain.bpc": 6.06, "sft.bpc": 6.87,
        "sft.polarity.accuracy": 0.7, "sft.polarity.no_label": 0.1, "sft.polarity.looping": 0.0,
        "sft.origin.char_f1": 0.093, "sft.origin.exact_match": 0.0, "sft.origin.looping": 0.1,
        "sft.looping": 0.05, "sft.samples.looping": 0.0,
        "sft.preference.accuracy": 0.24, "sft.preference.mean_margin": -3.0,
        "sft.choice.idioms.letter_accuracy": 0.25, "sft.choice.idioms.cloze_accuracy": 0.5}
    assert flat["dpo.implicit_reward.accuracy"] == 0.8 and flat["dpo.implicit_reward.mean_margin"] == 0.25
    assert flat["dpo.looping"] == 0.5 and flat["dpo.origin.looping"] == 0.5
    assert not any(k.startswith("retrieval.") for k in flat)
    retrieval = {"task": "meaning", "n": 100, "recall@1": 0.97, "recall@5": 1.0,
                 "char_f1": {"without": 0.072, "with": 0.073, "best_passage": 0.33}}
    assert summary(RESULTS, retrieval) == flat | {"retrieval.recall@1": 0.97, "retrieval.recall@5": 1.0,
                                                  "retrieval.char_f1.without": 0.072, "retrieval.char_f1.with": 0.073}


def test_report_shows_each_stage_beside_the_previous(tmp_path):
    out = tmp_path / "report.md"
    write_report(RESULTS, out)
    text = out.read_text(encoding="utf-8")
    stages = text.split("## Stage by stage")[1].split("\n## ")[0]
    assert "| metric | pretrain | sft | Δ | dpo | Δ |" in stages
    assert "| bpc | 6.060 | 6.870 | +0.810 | 6.900 | +0.030 |" in stages
    assert "| origin.char_f1 | – | 0.093 | – | 0.045 | -0.048 |" in stages        # pretrain answers nothing
    assert "| implicit_reward.accuracy | – | – | – | 0.800 | – |" in stages
    assert "| looping | – | 0.050 | – | 0.500 | +0.450 |" in stages
    assert "| choice.idioms.letter_accuracy | – | 0.250 | – | 0.375 | +0.125 |" in stages
    looping = text.split("## Looping answers")[1].split("\n## ")[0]
    assert "| sample answers | 0.000 | 0.750 | +0.750 |" in looping and "| origin | 0.100 | 0.500 | +0.400 |" in looping


def test_paired_difference_and_its_standard_error():
    mean, se = paired_difference([0, 1, 1, 0], [1, 1, 1, 1])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 3) / 2)  # differences 1, 0, 0, 1: sd √(1/3)
    assert paired_difference([0.2, 0.4], [0.3, 0.5]) == (pytest.approx(0.1), pytest.approx(0.0))


def test_report_says_which_changes_are_beyond_noise(tmp_path):
    """DPO gets every polarity item right that SFT got wrong (a change far beyond noise), answers
    origin as SFT did but for one item (within noise), and loops on one origin answer more."""
    def answers(task, scores, looping=()):
        return [{"id": f"x{i}#{task}", "task": task, "score": score, "prompt": "p", "reference": "r",
                 "answer": "不与之，" * 5 if i in looping else "答"} for i, score in enumerate(scores)]
    sft = answers("polarity", [0.0] * 30 + [1.0] * 10) + answers("origin", [0.1] * 40)
    dpo = answers("polarity", [1.0] * 40) + answers("origin", [0.1] * 39 + [0.3], looping={5})
    out = tmp_path / "report.md"
    write_report({"sft": {"task_answers": sft}, "dpo": {"task_answers": dpo}}, out)
    section = out.read_text(encoding="utf-8").split("## Changes beyond noise?")[1].split("\n## ")[0]
    assert "| sft → dpo | polarity | score | 40 | +0.750 | 0.069 | beyond noise |" in section
    assert "| sft → dpo | origin | score | 40 | +0.005 | 0.005 | within noise |" in section
    assert "| sft → dpo | origin | looping | 40 | +0.025 | 0.025 | within noise |" in section


def test_delta_table_compares_each_column_with_the_one_before():
    lines = delta_table({"a": {"x": 1.0, "y": 2.0}, "b": {"x": 1.5, "z": 0.0021},
                         "c": {"x": 1.25, "y": 3.0, "z": 0.0017}})
    assert lines[:2] == ["| metric | a | b | Δ | c | Δ |", "|---|---|---|---|---|---|"]
    assert lines[2:5] == ["| x | 1.000 | 1.500 | +0.500 | 1.250 | -0.250 |", "| y | 2.000 | – | – | 3.000 | – |",
                          "| z | – | 0.002 | – | 0.002 | +0.000 |"]  # never "-0.000"


def test_compare_eval_prints_summaries_side_by_side(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_eval", REPO / "benchmarks/compare_eval.py")
    compare_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_eval)
    write_json({"sft.bpc": 6.87, "dpo.looping": 0.5}, tmp_path / "before.json")
    write_json({"sft.bpc": 6.5, "dpo.looping": 0.02, "dpo.implicit_reward.accuracy": 0.93}, tmp_path / "after.json")
    compare_eval.main([str(tmp_path / "before.json"), str(tmp_path / "after.json")])
    printed = capsys.readouterr().out
    assert f"| metric | {tmp_path / 'before.json'} | {tmp_path / 'after.json'} | Δ |" in printed
    assert "| sft.bpc | 6.870 | 6.500 | -0.370 |" in printed
    assert "| dpo.looping | 0.500 | 0.020 | -0.480 |" in printed
    assert "| dpo.implicit_reward.accuracy | – | 0.930 | – |" in printed


def test_text_budget_streams_the_same_texts_as_sorting_all_of_them():
    """The held-out budget is the first texts in hash order that fit, whatever the order they come in."""
    def digest(text):
        return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()

    def by_sorting(texts, max_chars):
        out, chars = [], 0
        for text in sorted((t for t in texts if t), key=digest):
            if out and chars + len(text) > max_chars:
                break
            out.append(text)
            chars += len(text)
        return out

    rng = random.Random(0)
    for _ in range(2000):
        texts = ["".join(rng.choice("甲乙丙丁戊己") for _ in range(rng.randint(0, 12)))
                 for _ in range(rng.randint(0, 30))]
        max_chars = rng.randint(1, 60)
        expected = by_sorting(texts, max_chars)
        assert _text_budget(iter(texts), max_chars) == expected
        assert _text_budget(reversed(texts), max_chars) == expected
