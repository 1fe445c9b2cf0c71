"""The entity-extraction task: gold entities from the tagged People's Daily, the answer format,
its parser, entity-level precision/recall/F1, and jieba's tagger as the baseline."""
import pytest

from zhlm.data import demo
from zhlm.data.split import item_key
from zhlm.eval.metrics import entity_counts, entity_scores, jieba_entities, parse_entities
from zhlm.eval.tasks import jieba_baseline, score_entities, score_task, task_of


def test_a_run_of_nr_words_is_one_person_and_repeats_count_once():
    words = [("江", "nr"), ("泽民", "nr"), ("会见", "v"), ("克林顿", "nr"), ("，", "w"), ("江", "nr"),
             ("泽民", "nr"), ("在", "p"), ("北京", "ns"), ("、", "w"), ("上海", "ns"), ("新华社", "nt"),
             ("中国", "ns"), ("共产党", "n")]
    assert demo.sentence_entities(words) == {
        "person": ["江泽民", "克林顿"], "place": ["北京", "上海", "中国"], "organization": ["新华社"]}


def test_format_lists_each_type_on_its_line_and_none_as_wu():
    assert demo.format_entities({"person": ["江泽民", "李鹏"], "place": ["北京"], "organization": []}) == (
        "人名：江泽民、李鹏\n地名：北京\n机构：无")


def test_demo_entity_rows_are_the_news_sentences_with_their_tagged_entities():
    rows = demo.entities()
    assert len(rows) > 20_000
    news = {r["id"]: r["text"] for r in demo.news()}
    for row in rows[:2000]:
        assert task_of(row["id"]) == "entities"
        sentence = row["prompt"].split("\n", 1)[1]
        assert sentence in news[item_key(row["id"])]  # the same line of the same corpus: held out together
        entities = parse_entities(row["response"])
        assert all(name in sentence for names in entities.values() for name in names)
    first = next(r for r in rows if r["id"] == "news:3#ner0")
    assert first["response"] == "人名：江泽民\n地名：无\n机构：中共中央"


@pytest.mark.parametrize("answer, expected", [
    ("人名：江泽民、李鹏\n地名：无\n机构：新华社", {"person": {"江泽民", "李鹏"}, "place": set(),
                                                  "organization": {"新华社"}}),
    # half-width colon, comma separators, a missing line, extra text around
    ("好的。\n人名: 江泽民, 李鹏\n机构：新华社；人民日报\n以上。", {"person": {"江泽民", "李鹏"}, "place": set(),
                                                               "organization": {"新华社", "人民日报"}}),
    ("人名：\n地名：北京\n地名：上海", {"person": set(), "place": {"北京", "上海"}, "organization": set()}),
    ("江泽民在北京", None),
    ("", None),
    (None, None),
])
def test_parse_entities(answer, expected):
    assert parse_entities(answer) == expected


def test_entity_scores_by_hand():
    gold = [{"person": {"江泽民"}, "place": {"北京", "上海"}, "organization": set()},
            {"person": set(), "place": set(), "organization": {"新华社"}}]
    pred = [{"person": {"江泽民", "李鹏"}, "place": {"北京"}, "organization": set()},
            None]  # an unparsable answer predicts nothing
    counts = [entity_counts(p, g) for p, g in zip(pred, gold)]
    scores = entity_scores(counts)
    assert scores["person"]["precision"] == 0.5 and scores["person"]["recall"] == 1.0
    assert scores["place"]["precision"] == 1.0 and scores["place"]["recall"] == 0.5
    assert scores["organization"]["precision"] == 0.0 and scores["organization"]["recall"] == 0.0
    micro = scores["micro"]  # 2 correct of 3 predicted, of 4 gold
    assert (micro["correct"], micro["predicted"], micro["gold"]) == (2, 3, 4)
    assert micro["f1"] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


def test_score_task_scores_entity_answers_and_counts_unparsed():
    items = [{"answer": "人名：江泽民\n地名：北京\n机构：无", "reference": "人名：江泽民\n地名：北京\n机构：无"},
             {"answer": "我不知道", "reference": "人名：无\n地名：上海\n机构：无"}]
    out = score_task("entities", items)
    assert (out["precision"], out["recall"]) == (1.0, pytest.approx(2 / 3))
    assert out["unparsed"] == 0.5 and out["by_type"]["place"]["recall"] == 0.5
    perfect = score_entities([parse_entities(it["reference"]) for it in items], [it["reference"] for it in items])
    assert perfect["f1"] == 1.0


def test_jieba_baseline_tags_people_places_and_organisations():
    found = jieba_entities("国家主席江泽民在北京会见了新华社记者。")
    assert "江泽民" in found["person"] and "北京" in found["place"] and "新华社" in found["organization"]
    rows = [{"id": f"news:{i}#ner0", "prompt": demo.ENTITY_PROMPT + "国家主席江泽民在北京会见了新华社记者。",
             "response": "人名：江泽民\n地名：北京\n机构：新华社"} for i in range(3)]
    rows.append({"id": "idiom:画蛇添足#meaning", "prompt": "？", "response": "。"})  # not an entity row
    baseline = jieba_baseline(rows, per_task_limit=2)
    assert baseline["n"] == 2 and baseline["f1"] == 1.0


def test_finetune_eval_scores_both_models_on_the_same_items_and_reports_them(model_dir, corpus, tmp_path):
    from zhlm.eval.finetune import evaluate_finetune
    from zhlm.eval.report import write_finetune_report

    entity_rows = [{"id": f"news:{i}#ner0", "prompt": demo.ENTITY_PROMPT + sentence, "response": response}
                   for i, (sentence, response) in enumerate([
                       ("江泽民在北京。", "人名：江泽民\n地名：北京\n机构：无"),
                       ("新华社报道。", "人名：无\n地名：无\n机构：新华社"),
                       ("天气很好。", "人名：无\n地名：无\n机构：无")])]
    task_rows = [{"id": f"review:{i}#polarity", "prompt": f"判断情感：很好{i}", "response": "正面"} for i in range(3)]
    settings = {"max_task_items": 2, "max_bpc_chars": 1000, "max_new_tokens": 6, "sample_max_new_tokens": 4,
                "batch_size": 4, "device": "cpu"}
    result = evaluate_finetune(model_dir, model_dir, finetune_rows=entity_rows, task_rows=task_rows,
                               val_files=[corpus / "val.parquet"], seq_len=32, settings=settings)
    assert result["finetune_tasks"] == ["entities"]
    for side in ("before", "after"):
        assert result[side]["tasks"]["entities"]["n"] == result[side]["tasks"]["polarity"]["n"] == 2
    # The same folder twice: the same answers, so the same scores; jieba on the same two sentences.
    assert result["before"]["tasks"] == result["after"]["tasks"]
    assert result["baseline"]["entities"]["n"] == 2
    write_finetune_report(result, tmp_path / "finetune.md")
    report = (tmp_path / "finetune.md").read_text()
    assert "## Entity extraction" in report and "jieba (no training)" in report
    assert "| metric | init | finetune | Δ |" in report  # each number after beside before
    assert "## Held-out tasks" in report and "entities" in report
