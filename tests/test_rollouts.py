"""DPO rollouts: a sample of prompts from every source; each task's answer budget; every prompt
counted; a right answer never rejected."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zhlm.inference import load
from zhlm.tokenizer.chat import encode_prompt, messages_of
from zhlm.train import rollouts

# prompt id -> (reference, the answer the fake model gives)
ROWS = {
    "a#polarity": ("正面", "正面"),                     # right: the same as the reference, dropped
    "b#polarity": ("负面", "正面"),                     # wrong: kept
    "c#pinyin": ("yī mǎ dāng xiān", "yī mǎ dāng xiān"),  # right: dropped
    "d#seg0": ("我 爱 北京 天安门", "我爱 北 京天安门"),   # wrong segmentation: kept
    "e#meaning": ("比喻做事很快", "很快很快很快很快很快很快"),    # free text that loops: kept, counted as looping
}


@pytest.fixture
def fake_generate(monkeypatch, model_dir):
    """The model 'answers' each prompt with ROWS' fixed answer; records each prompt's token budget."""
    lm = load(model_dir, "cpu")
    by_prompt = {tuple(encode_prompt(lm.tokenizer, messages_of({"id": i, "prompt": i, "response": None}))): i
                 for i in ROWS}
    budgets = {}

    def generate(model, prompts, sampling, *, stop_ids=(), generator=None):
        ids = [by_prompt[tuple(p)] for p in prompts]
        budgets.update(dict.fromkeys(ids, sampling.max_new_tokens))
        return [lm.tokenizer.encode(ROWS[i][1], add_special_tokens=False).ids for i in ids]

    monkeypatch.setattr(rollouts, "generate", generate)
    return lm, budgets


def test_rollout_pairs_and_counts(fake_generate):
    lm, budgets = fake_generate
    rows = [{"id": i, "source": "s", "prompt": i, "response": ref} for i, (ref, _) in ROWS.items()]
    sampling = rollouts.Sampling(max_new_tokens=64, temperature=0.0)
    table, stats = rollouts.rollout(lm.model, lm.tokenizer, rows, sampling, batch_size=2, max_similarity=0.9,
                                    progress=False)
    assert set(table.column("id").to_pylist()) == {"b#polarity", "d#seg0", "e#meaning"}
    assert table.column("rejected").to_pylist() == [ROWS[i][1] for i in table.column("id").to_pylist()]
    assert stats["dropped_similar"] == 2
    assert stats["pairs"] + stats["dropped_similar"] + stats["skipped_too_long"] == stats["prompts"] == len(ROWS)
    assert stats["looping_rollouts"] == 1
    # A segmentation answer repeats its sentence: twice the budget, as the eval gives it.
    assert budgets["d#seg0"] == 128 and budgets["a#polarity"] == budgets["e#meaning"] == 64


def write_prompts(path, source, numbers):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{source}:{n}", "source": source, "prompt": f"问题{n}", "response": f"答案{n}"} for n in numbers]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_the_prompt_sample_takes_every_source_in_its_share_whatever_the_files(tmp_path):
    # Three sources whose ids sort one after another: the first 150 by id would all be "a".
    one_file_each = [write_prompts(tmp_path / "whole" / f"{s}.parquet", s, range(300)) for s in "abc"]
    shards = [write_prompts(tmp_path / "shards" / f"{s}{k}.parquet", s, range(k, 300, 2))
              for s in "cba" for k in (1, 0)]
    sample = rollouts.sample_prompts(one_file_each, 150)
    assert sample == rollouts.sample_prompts(shards, 150)  # the same rows, in id order, whatever the sharding
    assert [r["id"] for r in sample] == sorted(r["id"] for r in sample) and len({r["id"] for r in sample}) == 150
    for source in "abc":
        assert 30 <= sum(r["source"] == source for r in sample) <= 70  # 50 expected
    assert all(r["response"] == "答案" + r["id"].split(":")[1] for r in sample)  # whole rows
    smaller = {r["id"] for r in rollouts.sample_prompts(one_file_each, 60)}
    assert smaller < {r["id"] for r in sample}  # a larger sample holds a smaller one
    assert len(rollouts.sample_prompts(one_file_each, 5000)) == 900
    assert {r["source"] for r in rollouts.sample_prompts(one_file_each, 5000, ["b"])} == {"b"}
