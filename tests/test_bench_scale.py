"""The corpus builder of benchmarks/bench_scale.py: lengths, planted copies and their ids."""
import importlib.util
import random
import re
import sys
from pathlib import Path

import pytest

from zhlm.data import demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks/bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sentences():
    """Sentences of the reviews only (the benchmark also uses news and idioms), shortest first."""
    pieces = {s for r in demo.reviews() for s in re.split(r"(?<=[。！？])", r["text"]) if len(s) >= 2}
    return sorted(pieces, key=lambda s: (len(s), s))


def test_corpus_has_its_size_lengths_and_planted_copies(bench, sentences):
    rows = bench.build_corpus(300_000, sentences, seed=1)
    texts = {r["id"]: r["text"] for r in rows}
    assert len(texts) == len(rows)
    originals = [i for i in texts if "#" not in i]
    assert sum(len(texts[i]) for i in originals) >= 300_000
    lengths = [len(texts[i]) for i in originals]
    assert min(lengths) >= 8 and max(lengths) <= 20_000
    assert sum(n < 60 for n in lengths) > 0.2 * len(lengths) and max(lengths) > 1_000

    exact = [i for i in texts if i.endswith("#exact")]
    near = [i for i in texts if i.endswith("#near")]
    assert len(exact) == round(0.02 * len(originals)) and len(near) == round(0.03 * len(originals))
    assert len({i.split("#")[0] for i in exact + near}) == len(exact) + len(near)
    for i in exact:
        assert texts[i] == texts[i.split("#")[0]]
    for i in near:
        copy, original = texts[i], texts[i.split("#")[0]]
        assert len(copy) == len(original)
        assert sum(a != b for a, b in zip(copy, original)) == max(1, round(0.05 * len(original)))
    assert [r["id"] for r in rows][:len(originals)] != originals  # shuffled


def test_near_copy_substitutes_other_cjk_characters(bench):
    text = "今天天气很好，我们去公园散步吧。" * 4
    copy = bench.near_copy(text, ["甲", "乙", "丙"], random.Random(0))
    changed = [(a, b) for a, b in zip(text, copy) if a != b]
    assert len(changed) == 3 and all(b in "甲乙丙" for _, b in changed)
