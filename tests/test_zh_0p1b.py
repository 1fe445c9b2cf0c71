"""config/zh-0.1b.yaml, the seed-scale recipe: its DAG, its sources' field templates,
its model's size, and one training step of that model on a CPU.

Nothing here reaches the network: the dry run runs with HF_ENDPOINT and every proxy
pointed at a closed port on 127.0.0.1, so a download attempted while the DAG is
built would fail the run.
"""
import copy
import json
import math
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_workflow import job_counts

from zhlm.data.formats import parse_source
from zhlm.data.schema import TEMPLATE_FIELDS
from zhlm.model import LlamaForCausalLM, ModelConfig
from zhlm.train.batches import TokenWindows
from zhlm.train.loop import TrainConfig, start, train
from zhlm.train.pretrain import next_token_loss

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config/zh-0.1b.yaml"
TARGET = "results/dpo/model.safetensors"
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there
OFFLINE = {"HF_ENDPOINT": CLOSED, "http_proxy": CLOSED, "https_proxy": CLOSED, "all_proxy": CLOSED,
           "HTTP_PROXY": CLOSED, "HTTPS_PROXY": CLOSED, "ALL_PROXY": CLOSED, "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG.read_text())


def model_config(config) -> ModelConfig:
    """The ModelConfig pretraining builds from this config (zhlm.train.pretrain.run).

    The workflow takes the vocabulary size from the trained tokenizer (binarize's
    meta.json); byte-level BPE fills the requested vocab_size unless the corpus runs
    out of pairs seen min_frequency times, which a corpus of this size never does.
    """
    return ModelConfig(**{"max_position_embeddings": config["pretrain"]["seq_len"], **config["model"]},
                       vocab_size=config["tokenizer"]["vocab_size"])


def expected_parameters(c: ModelConfig) -> int:
    """Parameters of the Llama decoder, counted from its shapes."""
    h, i, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    head_dim = h // c.num_attention_heads
    q = o = h * c.num_attention_heads * head_dim
    k = v_proj = h * c.num_key_value_heads * head_dim
    mlp = 3 * h * i                       # gate, up, down (SwiGLU)
    norms = 2 * h                         # input and post-attention RMSNorm weights
    embeddings = v * h * (1 if c.tie_word_embeddings else 2)
    return embeddings + layers * (q + k + v_proj + o + mlp + norms) + h  # + the final norm


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return LlamaForCausalLM(model_config(config))


# --- the config itself ----------------------------------------------------------


def test_config_validates_and_its_stages_fit_the_model(config):
    from snakemake.utils import validate

    full = copy.deepcopy(config)
    validate(full, str(REPO / "workflow/schemas/config.schema.yaml"))  # fills the defaults in
    context = full["model"]["max_position_embeddings"]
    for stage in ("pretrain", "sft", "dpo"):
        s = full[stage]
        assert s["seq_len"] <= context, stage
        assert s["global_batch"] % (s["micro_batch"] * s["nproc"] * s["nodes"]) == 0, stage
    assert full["tokenizer"]["model_max_length"] == context


def test_every_hub_source_is_pinned_to_a_commit(config):
    for name, src in config["sources"].items():
        assert src["uri"].startswith("hf://datasets/"), name
        assert re.search(r"@[0-9a-f]{40}$", src["uri"]), f"{name}: not pinned to a commit"
        if "sha256" in src:
            assert re.fullmatch(r"[0-9a-f]{64}", src["sha256"]), name


# --- the DAG, offline -----------------------------------------------------------


def test_dry_run_lists_the_whole_dag_without_the_network(config, tmp_path):
    env = {**os.environ, **OFFLINE}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
           "-n", "--cores", "16", f"--configfile={CONFIG}", TARGET]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]

    sources = config["sources"]
    trained = [name for name, src in sources.items() if src["kind"] != "choice"]
    kinds = [k for k in ("pretrain", "sft", "dpo") if any(sources[n]["kind"] == k for n in trained)]
    expected = {
        "download": len(trained), "parse": sum(sources[n].get("shards", 1) for n in trained),
        "clean_shard": sum(sources[n].get("shards", 1) for n in trained),
        "dedup_signatures": sum(sources[n].get("shards", 1) for n in trained), "dedup_exact": len(kinds),
        "dedup_bands": len(kinds) * config["dedup"]["band_jobs"], "dedup_cluster": len(kinds),
        "dedup_filter": sum(sources[n].get("shards", 1) for n in trained), "dedup_summary": len(kinds),
        **{f"split_{k}": sum(sources[n].get("shards", 1) for n in trained if sources[n]["kind"] == k) for k in kinds},
        "count_words": 1, "build_tokenizer": 1, "binarize": 1, "tokenize_sft": 1, "tokenize_dpo": 1,
        "pretrain": 1, "sft": 1, "rollouts": 1, "dpo": 1,
    }
    assert job_counts(output) == expected
    # Each source lands under results/raw/<source>/ with the file name of its URI.
    for name in trained:
        file_name = sources[name]["uri"].split("@")[0].rsplit("/", 1)[1]
        assert f"results/raw/{name}/{file_name}" in output
    assert not (tmp_path / "results").exists()  # a dry run makes nothing


# --- the sources' field templates -------------------------------------------------

# One made-up record per dataset, with the field names the published files have
# (dataset cards, the files' own layout); the values are placeholders.
PUBLISHED_RECORDS = {
    "pleisto/wikipedia-cn-20230720-filtered": [
        {"completion": "长江是亚洲第一长河。", "source": "wikipedia"}],
    "wangrui6/Zhihu-KOL": [
        {"INSTRUCTION": "如何评价这本书？", "RESPONSE": "值得一读。", "SOURCE": "Zhihu",
         "METADATA": "{}"}],
    "BelleGroup/train_1M_CN": [
        {"instruction": "把下面的句子翻译成英文。", "input": "今天天气很好。", "output": "The weather is nice today."},
        {"instruction": "写一首关于春天的诗。", "input": "", "output": "春风拂面，花开满园。"}],
    "BelleGroup/train_0.5M_CN": [
        {"instruction": "给出三个保持健康的建议。", "input": "", "output": "多运动，睡好觉，吃得均衡。"}],
    "llm-wizard/alpaca-gpt4-data-zh": [
        {"instruction": "保持健康的三个提示。", "input": "", "output": "以下是保持健康的三个提示。"}],
}


def write_records(records: list[dict], path: Path, fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise AssertionError(f"no sample writer for {fmt}")


def test_each_sources_templates_name_the_fields_its_dataset_has(config, tmp_path):
    for name, src in config["sources"].items():
        repo = "/".join(src["uri"].removeprefix("hf://datasets/").split("/")[:2])
        records = PUBLISHED_RECORDS[repo]
        path = tmp_path / f"{name}.{src['format']}"
        write_records(records, path, src["format"])
        templates = {f: src[f] for f in TEMPLATE_FIELDS if f in src}
        rows, rejects, stats = parse_source(path, src["format"], source=name, kind=src["kind"],
                                            templates=templates, id_template=src.get("id"))
        assert rejects.num_rows == 0, (name, rejects.to_pylist())
        assert stats["rows_kept"] == len(records)
        for index, (row, record) in enumerate(zip(rows.to_pylist(), records)):
            assert row["id"] == f"{name}:{index}"
            for field, template in templates.items():
                for _, key, _, _ in string.Formatter().parse(template):
                    if key:  # every field a template names is in the record, and its value in the row
                        assert record[key] in row[field], (name, field, key)


def test_dpo_rollouts_answer_the_gpt4_prompts(config):
    """Rollouts answer a sample of max_prompts of alpaca-gpt4-data-zh's DPO prompts, GPT-4's answers chosen."""
    assert config["rollouts"]["sources"] == ["alpaca_gpt4_zh"]
    band = 48_000 * config["split"]["dpo_prompts"]  # alpaca-gpt4-data-zh has about 49K rows
    assert config["rollouts"]["max_prompts"] < 0.9 * band


# --- the model ------------------------------------------------------------------


def test_the_model_has_about_a_tenth_of_a_billion_parameters(config, model):
    c = model_config(config)
    expected = expected_parameters(c)
    assert sum(p.numel() for p in model.parameters()) == expected  # tied weights counted once
    assert c.num_parameters() == expected
    assert 0.08e9 < expected < 0.15e9
    assert expected == 109_529_856  # the figure the config's comment states


def test_one_training_step_on_a_cpu(config, model, tmp_path):
    vocab = model.config.vocab_size
    settings = {**config["pretrain"], "steps": 1, "global_batch": 2, "micro_batch": 1, "seq_len": 32,
                "warmup_steps": 0, "phases": None, "dtype": "fp32", "compile": False, "device": "cpu", "nproc": 1,
                "nodes": 1}
    cfg, device, fingerprint = start(settings, [], extra={"model": config["model"]})
    assert isinstance(cfg, TrainConfig) and device.type == "cpu"
    # The recipe's optimizer settings; only the batch, the schedule and the device are changed.
    for key in ("lr", "weight_decay", "grad_clip", "beta1", "beta2"):
        assert getattr(cfg, key) == config["pretrain"][key], key

    tokens = np.random.default_rng(0).integers(0, vocab, size=4096, dtype=np.uint16)
    data = TokenWindows(tokens, settings["seq_len"], cfg.global_batch, cfg.seed)
    watched = {name: p.detach().clone() for name, p in model.named_parameters()
               if name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                           "model.layers.11.mlp.down_proj.weight", "model.norm.weight")}
    assert len(watched) == 4

    history = train(model, data, next_token_loss, cfg, out_dir=tmp_path / "out", ckpt_dir=tmp_path / "ckpt",
                    fingerprint=fingerprint, tokens_per_item=settings["seq_len"], progress=False)

    assert len(history) == 1
    loss = history[0]["loss"]
    assert math.isfinite(loss) and math.isfinite(history[0]["grad_norm"])
    assert abs(loss - math.log(vocab)) < 0.5, loss  # a fresh model guesses uniformly: ln(32000) = 10.37
    params = dict(model.named_parameters())
    for name, before in watched.items():
        assert not torch.equal(params[name].detach(), before), f"{name} did not change"
    assert (tmp_path / "out/train_log.csv").exists()
