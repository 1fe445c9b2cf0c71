"""Staged pretraining (pretrain.phases): each phase's mixture, its learning-rate shape, resume
across a phase boundary, and the single-phase path left as it was."""
import json
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import pretrain_cmd, run_until_checkpoint_then_kill, weights

from zhlm.io import read_json, write_json, write_parquet
from zhlm.tokenizer.binarize import binarize
from zhlm.train.batches import MixtureWindows, TokenWindows
from zhlm.train.loop import TrainConfig, learning_rate, start
from zhlm.train.phases import Phase
from zhlm.train.pretrain import training_windows

# A token file of 40,000 tokens; "b" has two spans (its rows came in two runs), one too short
# for a window of 33 tokens.
SPANS = {"a": [[0, 12000]], "b": [[12000, 12020], [30000, 40000]], "c": [[12020, 30000]]}
TOKENS = np.arange(40000, dtype=np.uint16)  # token i is i: a window's tokens say where it lies


def source_of(start: int) -> str:
    return next(name for name, runs in SPANS.items() for a, b in runs if a <= start < b)


def test_each_phase_draws_its_mixture_in_proportion_and_no_window_straddles_two_sources():
    phases = [Phase(steps=250, mixture={"a": 1, "b": 1, "c": 2}), Phase(steps=250, mixture={"c": 0.5, "a": 2.0}),
              Phase(steps=250)]
    windows = MixtureWindows(TOKENS, SPANS, phases, seq_len=32, global_batch=16, seed=7)
    expected = [{"a": 0.25, "b": 0.25, "c": 0.5}, {"a": 0.8, "c": 0.2},
                # no mixture: every source by its windows, (tokens - 32) per span of room
                {"a": 11968 / 39884, "b": 9968 / 39884, "c": 17948 / 39884}]
    for k, shares in enumerate(expected):
        counts = dict.fromkeys(SPANS, 0)
        for step in range(250 * k, 250 * (k + 1)):  # 4,000 windows
            batch = windows.global_batch(step)
            for row in batch["input_ids"].numpy():
                first, last = int(row[0]), int(row[-1]) + 1  # the label after the last input
                assert source_of(first) == source_of(last), f"step {step}: a window from {first} to {last}"
                counts[source_of(first)] += 1
        for name in SPANS:
            assert counts[name] / 4000 == pytest.approx(shares.get(name, 0.0), abs=0.02), (k, name, counts)


def test_windows_depend_only_on_seed_and_step():
    phases = [Phase(steps=3, mixture={"a": 1, "c": 1}), Phase(steps=3, mixture={"b": 1})]
    one = MixtureWindows(TOKENS, SPANS, phases, seq_len=32, global_batch=8, seed=1)
    other = MixtureWindows(TOKENS, SPANS, phases, seq_len=32, global_batch=8, seed=1)
    for step in (5, 0, 3, 5):
        assert torch.equal(one.global_batch(step)["input_ids"], other.global_batch(step)["input_ids"])
    assert not torch.equal(one.global_batch(0)["input_ids"],
                           MixtureWindows(TOKENS, SPANS, phases, 32, 8, seed=2).global_batch(0)["input_ids"])


def test_a_mixture_of_a_source_without_tokens_fails_naming_it():
    with pytest.raises(ValueError, match=r"pretrain.phases\[1\].mixture names 'd', which has no tokens"):
        MixtureWindows(TOKENS, SPANS, [Phase(steps=1), Phase(steps=1, mixture={"d": 1})], 32, 8, 0)
    with pytest.raises(ValueError, match=r"'b', whose text has no span of seq_len \+ 1 = 10001 tokens"):
        MixtureWindows(TOKENS, SPANS, [Phase(steps=1, mixture={"a": 1, "b": 1})], 10000, 8, 0)


def old_token_windows(tokens, seq_len, global_batch, seed, step):
    """TokenWindows.global_batch as it was before phases: what a run without phases must still see."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len - 1, size=global_batch)
    rows = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def test_without_phases_the_windows_and_learning_rates_are_those_of_a_single_phase_run():
    cfg = TrainConfig(steps=100, global_batch=8, seq_len=32, schedule="wsd", decay_fraction=0.3, warmup_steps=10)
    meta = {"sources": SPANS}  # spans are there, but unused without phases
    data = training_windows(TOKENS, meta, cfg)
    assert type(data) is TokenWindows
    for step in (0, 1, 57):
        inputs, labels = old_token_windows(TOKENS, 32, 8, cfg.seed, step)
        batch = data.global_batch(step)
        assert torch.equal(batch["input_ids"], inputs) and torch.equal(batch["labels"], labels)
    # One phase shaped as the stage is the same schedule, step for step.
    one_phase = TrainConfig(steps=100, schedule="cosine", warmup_steps=10,
                            phases=[{"steps": 100, "schedule": "wsd", "warmup_steps": 10, "decay_fraction": 0.3}])
    assert [learning_rate(cfg, s) for s in range(100)] == [learning_rate(one_phase, s) for s in range(100)]


def test_each_phase_has_its_own_learning_rate_shape():
    cfg = TrainConfig(steps=20, lr=1.0, min_lr_ratio=0.1, warmup_steps=7, schedule="cosine",  # the stage's: unused
                      phases=[{"steps": 10, "warmup_steps": 2}, {"steps": 10, "decay_fraction": 1.0}])
    lrs = [learning_rate(cfg, s) for s in range(20)]
    assert lrs[:2] == [0.5, 1.0], "the stable phase warms up over its own 2 steps"
    assert lrs[2:10] == [1.0] * 8
    assert lrs[10:] == pytest.approx([1 - 0.9 * (i + 1) / 10 for i in range(10)]), "then decays to the floor"
    assert lrs[19] == pytest.approx(0.1)


def test_the_fingerprint_covers_the_phases():
    settings = {"steps": 4, "phases": [{"steps": 2}, {"steps": 2, "mixture": {"a": 1, "b": 2}}]}
    other = json.loads(json.dumps(settings))
    other["phases"][1]["mixture"]["b"] = 3
    assert start(settings, [])[2] == start(settings, [])[2] != start(other, [])[2]


# --- a two-phase pretrain, killed at the boundary or inside the second phase, resumes -------------

@pytest.fixture(scope="module")
def sourced_tokens(corpus, tmp_path_factory):
    """The corpus fixture's train text as three sources (a token file with per-source spans)."""
    root = tmp_path_factory.mktemp("sourced")
    texts = pq.read_table(corpus / "train.parquet").column("text").to_pylist()
    sources = ["news"] * 150 + ["reviews"] * 200 + ["idioms"] * (len(texts) - 350)
    write_parquet(pa.table({"source": sources, "text": texts}), root / "train.parquet")
    meta = {"train": binarize(root / "train.parquet", corpus / "tokenizer/tokenizer.json", root / "tokens/train.bin",
                              progress=False),
            "val": read_json(corpus / "tokens/meta.json")["val"]}
    shutil.copy(corpus / "tokens/val.bin", root / "tokens/val.bin")
    write_json(meta, root / "tokens/meta.json")
    shutil.copytree(corpus / "tokenizer", root / "tokenizer")
    return root


def test_a_two_phase_pretrain_killed_at_the_boundary_resumes_to_the_uninterrupted_weights(sourced_tokens, tmp_path):
    # Phase 1 is steps 0-3, phase 2 steps 4-11; the kill comes once the first checkpoint, of step 4, is
    # written, so the rerun starts at phase 2's first step (its learning rate, its mixture).
    recipe = {"steps": 12, "optimizer": "muon", "checkpoint_every": 4, "phases": [
        {"steps": 4, "warmup_steps": 2}, {"steps": 8, "decay_fraction": 1.0, "mixture": {"idioms": 3, "news": 1}}]}
    subprocess.run(pretrain_cmd(sourced_tokens, tmp_path / "straight", **recipe), check=True, capture_output=True)
    resumed = tmp_path / "resumed"
    run_until_checkpoint_then_kill(pretrain_cmd(sourced_tokens, resumed, **recipe), resumed / "_ckpt/last.pt")
    rerun = subprocess.run(pretrain_cmd(sourced_tokens, resumed, **recipe), capture_output=True, text=True,
                           check=True)
    assert "at step 4" in rerun.stderr

    a, b = weights(tmp_path / "straight"), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = (resumed / "train_log.csv").read_text().splitlines()
    phase = log[0].split(",").index("phase")
    assert [int(row.split(",")[phase]) for row in log[1:]] == [0] * 4 + [1] * 8


def test_phases_that_do_not_add_up_to_the_steps_fail_naming_the_keys():
    with pytest.raises(ValueError, match=r"pretrain.phases' steps add up to 9 \(4 \+ 5\), not pretrain.steps \(10\)"):
        TrainConfig(steps=10, phases=[{"steps": 4}, {"steps": 5}])
    with pytest.raises(ValueError, match=r"pretrain.phases\[0\].mixture.a \(-1\) must be a positive weight"):
        TrainConfig(steps=4, phases=[{"steps": 4, "mixture": {"a": -1}}])
