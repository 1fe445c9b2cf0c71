
from zhlm.data.schema import rows_table
from zhlm.data.split import SPLITS, assign, split_point, split_table


def test_tasks_follow_their_item_across_kinds():
    for i in range(2000):
        item = f"idiom:{i}"
        where = assign(item, "pretrain", holdout=0.1, dpo_prompts=0.2)
        task = assign(f"{item}#pinyin", "sft", holdout=0.1, dpo_prompts=0.2)
        assert (where == "val") == (task == "eval")


def test_split_is_a_partition_with_the_configured_shares():
    rows = [{"id": f"s:{i}", "source": "s", "prompt": "问", "response": "答"} for i in range(20000)]
    parts, stats = split_table(rows_table(rows, "sft"), "sft", holdout=0.05, dpo_prompts=0.1)
    assert set(parts) == set(SPLITS["sft"])
    assert sum(t.num_rows for t in parts.values()) == stats["rows_in"] == 20000
    ids = [i for t in parts.values() for i in t.column("id").to_pylist()]
    assert len(set(ids)) == 20000
    assert abs(parts["eval"].num_rows / 20000 - 0.05) < 0.01
    assert abs(parts["dpo_prompts"].num_rows / 20000 - 0.1) < 0.01
    assert all(split_point(i) < 0.05 for i in parts["eval"].column("id").to_pylist())


def test_bad_fractions_fail():
    table = rows_table([], "pretrain")
    for holdout, dpo in ((1.0, 0), (-0.1, 0), (0.5, 0.6)):
        try:
            split_table(table, "pretrain", holdout=holdout, dpo_prompts=dpo)
        except ValueError:
            continue
        raise AssertionError((holdout, dpo))
