import json
import random

import pyarrow as pa
import pytest

from zhlm.data import demo
from zhlm.data.clean import cjk_ratio, clean_table, clean_text
from zhlm.data.schema import REJECT_SCHEMA, rows_table


def test_nfkc_folds_full_width_letters_and_digits():
    assert clean_text("ＡＢＣ１２３ｘｙｚ") == "ABC123xyz"
    assert clean_text("价格１２０元") == "价格120元"


def test_traditional_to_simplified():
    assert clean_text("漢字") == "汉字"
    assert clean_text("頭髮乾燥，後來瞭解了。") == "头发干燥，后来了解了。"


def test_zero_width_and_control_characters_are_removed():
    s = "a\u200bb\u200cc\u200dd\u2060e\ufeff\u00adf\x00g\x07h\x1bi\u202ej"
    assert clean_text(s) == "abcdefghij"
    assert clean_text("中\u200b文") == "中文"
    assert clean_text("一\t二\n三") == "一 二\n三"          # \t and \n are not controls here
    assert clean_text("a\ud800b") == "ab"                   # a lone surrogate cannot be written


def test_whitespace_is_normalised():
    assert clean_text("  你好\u3000\u3000世界 \t！ ") == "你好 世界！"
    assert clean_text("第一行\r\n第二行\r第三行") == "第一行\n第二行\n第三行"
    assert clean_text("一  \n\n\n\n   二\n\n三") == "一\n\n二\n\n三"
    assert clean_text("a\u00a0\u2003b") == "a b"
    assert clean_text(" \n\t\u3000 ") == ""
    # Spaces between words are kept: word-segmented text depends on them.
    assert clean_text("我们 从事 艺术 工作") == "我们 从事 艺术 工作"


@pytest.mark.parametrize("text", [
    "This class is good.",
    "Hello, world!",
    "Wait... what? (really) yes; no: maybe ~ok",
    "Wow!!! Such punctuation??",
    "时间10:30",           # between digits: not next to a CJK character
    "1~2",
])
def test_english_punctuation_is_untouched(text):
    assert clean_text(text) == text


@pytest.mark.parametrize("raw, clean", [
    ("你好,世界!", "你好，世界！"),
    ("你好，世界！", "你好，世界！"),          # NFKC folds them, the policy restores them
    ("他说:“好”;然后(笑)走了~", "他说：“好”；然后（笑）走了～"),
    ("什么?", "什么？"),
    ("“你好”, 他说", "“你好”，他说"),         # the nearest neighbour on the right is CJK
    ("价格 (含税) 100元", "价格（含税）100元"),
    ("中文(English)", "中文（English）"),    # a pair is converted together
    ("时间:10:30", "时间：10:30"),
    ("网址:http://a.com/?x=1", "网址：http://a.com/?x=1"),
])
def test_full_width_restored_next_to_cjk(raw, clean):
    assert clean_text(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("好的。。。。", "好的。"),
    ("太好了！！！！", "太好了！"),
    ("太好了!!!!", "太好了！"),
    ("真的吗？？？", "真的吗？"),
    ("是的，，对", "是的，对"),
    ("你好 ! !", "你好！"),
    ("真的?!", "真的？！"),                    # different marks are not collapsed
    ("甲、、乙", "甲、乙"),
])
def test_repeated_punctuation_collapses(raw, clean):
    assert clean_text(raw) == clean


@pytest.mark.parametrize("raw, clean", [
    ("他说……然后", "他说……然后"),
    ("他说...然后", "他说……然后"),
    ("他说..", "他说……"),
    ("等等…………好", "等等……好"),
    ("——破折号——", "——破折号——"),
    ("好...!!!", "好……！"),
    ("Wait... 好", "Wait……好"),
    ("Wait...", "Wait..."),
    ("圆周率是3.14", "圆周率是3.14"),
])
def test_ellipsis_and_dash(raw, clean):
    assert clean_text(raw) == clean


def test_korean_keeps_ascii_punctuation():
    assert clean_text("안녕, 하세요!") == "안녕, 하세요!"


def test_long_runs_of_marks_are_fast():
    import time
    t = time.perf_counter()
    for s in ("好 " + "." * 100_000 + " x", "x" + "! " * 50_000 + "x好", "x" + "..!" * 30_000):
        clean_text(s)
    assert time.perf_counter() - t < 2


def test_idempotent_on_demo_rows():
    rng = random.Random(0)
    for name in ("news", "reviews", "idioms"):
        rows = demo.build(name)
        for row in rng.sample(rows, 400):
            once = clean_text(row["text"])
            assert clean_text(once) == once, row["id"]
    for s in ("漢字，測試！！", "a\u200b  b\r\n\r\n\r\nc", "好…", "中文(English)", "好 , 好", "你好!..."):
        assert clean_text(clean_text(s)) == clean_text(s)


def test_cjk_ratio():
    assert cjk_ratio("") == 0.0
    assert cjk_ratio("   \n") == 0.0
    assert cjk_ratio("中文") == 1.0
    assert cjk_ratio("中文 ab") == 0.5
    assert cjk_ratio("中文，。") == 0.5     # punctuation counts as a character, not as Han


def _pretrain(texts):
    return rows_table([{"id": f"t:{i}", "source": "t", "text": t} for i, t in enumerate(texts)], "pretrain")


def test_filters_and_their_reasons():
    texts = [
        "这是一段正常的中文文本。",            # kept
        "  \u200b\u3000 ",                     # empty after cleaning
        "短文本",                              # too short
        "很长的文本" * 20,                     # too long
        "This is an English sentence.",        # low chinese ratio
        None,                                  # empty after cleaning
        "漢字，測試！一個正常的句子。",        # kept, cleaned
    ]
    kept, rejects, stats = clean_table(_pretrain(texts), "pretrain", min_chars=5, max_chars=50, min_cjk_ratio=0.5)
    assert kept.column("text").to_pylist() == ["这是一段正常的中文文本。", "汉字，测试！一个正常的句子。"]
    assert kept.column("id").to_pylist() == ["t:0", "t:6"]
    assert kept.schema == _pretrain([]).schema
    assert rejects.schema == REJECT_SCHEMA
    got = {r["index"]: (r["id"], r["reason"]) for r in rejects.to_pylist()}
    assert got == {
        1: ("t:1", "empty after cleaning"),
        2: ("t:2", "too short"),
        3: ("t:3", "too long"),
        4: ("t:4", "low chinese ratio"),
        5: ("t:5", "empty after cleaning"),
    }
    assert rejects.to_pylist()[0]["content"] == ""
    assert rejects.column("source").to_pylist() == ["t"] * 5
    assert stats["rows_in"] == 7 == stats["rows_kept"] + stats["rows_rejected"]
    assert stats["reasons"] == {"empty after cleaning": 2, "too short": 1, "too long": 1, "low chinese ratio": 1}
    assert sum(stats["reasons"].values()) == stats["rows_rejected"]
    assert stats["chars_out"] == sum(len(t) for t in kept.column("text").to_pylist())
    assert stats["chars_in"] == sum(len(t or "") for t in texts)


def test_sft_cleans_every_field_and_rejects_an_empty_one():
    history = json.dumps([{"role": "user", "content": "漢字？？"}, {"role": "assistant", "content": "是的!!"}],
                         ensure_ascii=False)
    rows = [
        {"id": "s:0", "source": "s", "prompt": "什麼是漢字?", "response": "漢字是文字。", "system": "你是助手 ",
         "history": history},
        {"id": "s:1", "source": "s", "prompt": "问题", "response": " \u200b ", "system": None, "history": None},
        {"id": "s:2", "source": "s", "prompt": "问题", "response": "答案", "system": None, "history": "not json"},
    ]
    kept, rejects, stats = clean_table(rows_table(rows, "sft"), "sft")
    first = kept.to_pylist()[0]
    assert first["prompt"] == "什么是汉字？" and first["response"] == "汉字是文字。" and first["system"] == "你是助手"
    assert json.loads(first["history"]) == [{"role": "user", "content": "汉字？"},
                                            {"role": "assistant", "content": "是的！"}]
    assert kept.to_pylist()[1]["history"] == "not json"    # passed through, never lost
    assert rejects.to_pylist()[0]["reason"] == "empty after cleaning" and rejects.to_pylist()[0]["id"] == "s:1"
    assert stats["rows_in"] == 3 and stats["rows_kept"] == 2 and stats["rows_rejected"] == 1


def test_empty_table():
    kept, rejects, stats = clean_table(_pretrain([]), "pretrain")
    assert kept.num_rows == rejects.num_rows == 0
    assert stats["rows_in"] == stats["rows_kept"] == stats["rows_rejected"] == 0


def test_shards_add_up_to_the_whole():
    texts = ["正常的中文句子。", "", "短", "另一个正常的句子！", "English only here.", "第三个正常句子。"] * 5
    table = _pretrain(texts)
    whole = clean_table(table, "pretrain", min_chars=3, min_cjk_ratio=0.5)
    # Parse shards of uneven sizes, each cleaned whole; index_offset is the rows before it.
    bounds = [0, 4, 5, 5, 17, len(texts)]
    parts = [clean_table(table.slice(lo, hi - lo), "pretrain", index_offset=lo, min_chars=3, min_cjk_ratio=0.5)
             for lo, hi in zip(bounds, bounds[1:])]
    assert pa.concat_tables([p[0] for p in parts]).equals(whole[0])
    assert pa.concat_tables([p[1] for p in parts]).equals(whole[1])    # indexes point into the whole table
    assert sum(p[2]["rows_in"] for p in parts) == len(texts)
