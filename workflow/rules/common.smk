# Helpers shared by the workflow files: which sources exist, and where their files go.
import os
import re
from urllib.parse import urlparse

from zhlm.data.split import SPLITS

SOURCES = config["sources"]


def sources_of(kind):
    return [name for name, src in SOURCES.items() if src["kind"] == kind]


def kinds():
    return [kind for kind in SPLITS if sources_of(kind)]


def raw_file(source):
    """results/raw/{source}/<file name of the URI>; a demo dataset is written as jsonl."""
    uri = SOURCES[source]["uri"]
    if uri.startswith("demo:"):
        name = uri.split(":", 1)[1] + ".jsonl"
    else:
        name = os.path.basename(urlparse(uri.split("@", 1)[0] if uri.startswith("hf://") else uri).path)
    return f"results/raw/{source}/{name}"


def templates(source):
    """The field templates a source declares (only those it sets)."""
    fields = ("text", "prompt", "response", "system", "history", "chosen", "rejected",
              "question", "A", "B", "C", "D", "answer")
    return {f: SOURCES[source][f] for f in fields if f in SOURCES[source]}


def clean_shards(source):
    return [f"results/clean/shards/{source}/{i}.parquet" for i in range(SOURCES[source]["shards"])]


def split_outputs():
    return [f"results/split/{kind}/{name}.parquet" for kind in kinds() for name in SPLITS[kind]]


def tokenizer_training_text():
    """Every training split: the tokenizer never sees held-out text."""
    return [f"results/split/{kind}/train.parquet" for kind in kinds()]
