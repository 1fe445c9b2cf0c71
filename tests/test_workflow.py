"""The whole DAG on a tiny config, in a temporary folder.

One source is served over HTTP from 127.0.0.1 with a pinned sha256; it plants
exact and near duplicates of real text and malformed rows, so dedup and the
rejects files are checked end to end.
"""
import csv
import functools
import hashlib
import http.server
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from gguf import GGUFReader
from project_files import copy_tree
from safetensors import safe_open
from slurm_cluster import ClusterUnavailable, SlurmCluster
from test_config import BROKEN, broken_config
from tokenizers import Tokenizer

from zhlm.data import demo
from zhlm.data.schema import merge_stats
from zhlm.data.split import item_key
from zhlm.eval.tasks import jieba_baseline
from zhlm.io import TOKENIZER_FILES

REPO = Path(__file__).resolve().parents[1]
TARGET = "results/tokens/train.bin"


def snakemake_command(workdir, *args, python=sys.executable, project=REPO):
    return [str(python), "-m", "snakemake", "-s", str(project / "Snakefile"), "-d", str(workdir),
            "--cores", "2", f"--configfile={workdir / 'config.yaml'}", *args]


def snakemake(workdir, *args, env=None, **where):
    """Snakemake on `workdir` with its config.yaml; `where`: another python or project folder."""
    return subprocess.run(snakemake_command(workdir, *args, **where), capture_output=True, text=True, env=env,
                          cwd=workdir)


def planted_rows():
    """Three unrelated news paragraphs, an exact and a near copy, and malformed rows."""
    long_lines = [r["text"] for r in demo.news()[5000:] if len(r["text"]) > 150][:3]
    a, b, c = long_lines
    rng = random.Random(0)
    chars = list(b)
    for i in rng.sample(range(len(chars)), k=len(chars) // 20):  # change 5% of the characters
        chars[i] = "龘"
    near_b = "".join(chars)
    lines = [json.dumps({"id": f"planted:{k}", "text": t}, ensure_ascii=False).encode()
             for k, t in (("a", a), ("b", b), ("c", c), ("a_copy", f"  {a} ！！"), ("b_near", near_b))]
    lines += [b'{"id": "planted:bad", "text": ', b'{"id": "planted:utf8", "text": "\xff\xfe"}',
              b'{"id": "planted:nofield"}', b'{"id": "planted:empty", "text": "   "}']
    return b"\n".join(lines) + b"\n", {"a": a, "b": b, "c": c}


def run_dag(workdir, *args, env=None):
    """The tiny config plus the planted source, served while Snakemake runs with `args`."""
    served = workdir / "served"
    served.mkdir()
    data, originals = planted_rows()
    (served / "planted.jsonl").write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    config = yaml.safe_load((REPO / "tests/tiny.yaml").read_text())
    config["sources"]["planted"] = {
        "kind": "pretrain", "uri": f"http://127.0.0.1:{server.server_port}/planted.jsonl",
        "sha256": hashlib.sha256(data).hexdigest()}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    try:
        run = snakemake(workdir, *args, env=env)
        assert run.returncode == 0, run.stderr[-5000:]
    finally:
        server.shutdown()
    return config, originals, run


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dag")
    # rule all: every stage, to the eval report; and the finetune's own target (tiny.yaml: finetune)
    config, originals, _ = run_dag(workdir, "all", "results/eval/finetune.md")
    return workdir, config, originals


def table(path):
    return pq.read_table(path).to_pylist()


def stats(path):
    return json.loads(Path(path).read_text())


def shard_paths(config, source, folder):
    return [f"{folder}/{source}/{i}" for i in range(config["sources"][source].get("shards", 1))]


def kind_of(config, source):
    """The kind a source is deduplicated and split with (common.smk): finetune for its sources."""
    return "finetune" if source in config.get("finetune", {}).get("sources", []) else config["sources"][source]["kind"]


def split_shards(config, kind):
    """The split's shard folders of a kind, in the order the stages after it read them."""
    return [p.replace("dedup/", "split/", 1) for s in config["sources"] if kind_of(config, s) == kind
            for p in shard_paths(config, s, f"dedup/{kind}")]


def split_rows(dag, kind, name):
    """The rows of one split of a kind: its shards' files, concatenated in order."""
    workdir, config, _ = dag
    return [r for path in split_shards(config, kind) for r in table(workdir / "results" / path / f"{name}.parquet")]


def test_row_accounting_adds_up_in_every_stats_file(dag):
    workdir, config, _ = dag
    results = workdir / "results"
    clean_kept = {}
    for source in config["sources"]:
        for path in shard_paths(config, source, "parsed"):  # each parse shard, and clean's shard of it, adds up
            parsed = stats(results / f"{path}.stats.json")
            assert parsed["rows_in"] == parsed["rows_kept"] + parsed["rows_rejected"]
            assert parsed["rows_kept"] == pq.read_metadata(results / f"{path}.parquet").num_rows
            assert parsed["rows_rejected"] == pq.read_metadata(results / f"{path}.rejects.parquet").num_rows
            clean_path = path.replace("parsed/", "clean/shards/", 1)
            clean = stats(results / f"{clean_path}.stats.json")
            assert clean["rows_in"] == parsed["rows_kept"]
            assert clean["rows_in"] == clean["rows_kept"] + clean["rows_rejected"]
            assert clean["rows_kept"] == pq.read_metadata(results / f"{clean_path}.parquet").num_rows
            assert clean["rows_rejected"] == pq.read_metadata(results / f"{clean_path}.rejects.parquet").num_rows
            clean_kept[clean_path] = clean["rows_kept"]
        parsed = merge_stats([stats(results / f"{p}.stats.json") for p in shard_paths(config, source, "parsed")])
        if limit := config["sources"][source].get("limit"):  # the first `limit` records of the whole source
            assert parsed["rows_in"] == min(limit, parsed["rows_in"] + parsed["records_beyond_limit"])
    for kind in ("pretrain", "sft", "finetune"):
        sources = [s for s in config["sources"] if kind_of(config, s) == kind]
        dedup = stats(results / f"dedup/{kind}.stats.json")
        assert dedup["rows_in"] == dedup["rows_kept"] + dedup["rows_removed"]
        assert dedup["rows_removed"] == dedup["removed_exact"] + dedup["removed_near"]
        paths = [p for s in sources for p in shard_paths(config, s, f"dedup/{kind}")]
        assert sorted(dedup["shards"]) == sorted(p.split("/", 2)[2] for p in paths)
        for path in paths:  # each shard: its clean rows in, kept + removed, as its files hold
            shard = stats(results / f"{path}.stats.json")
            assert shard == dedup["shards"][path.split("/", 2)[2]]
            assert shard["rows_in"] == clean_kept[path.replace(f"dedup/{kind}", "clean/shards")]
            assert shard["rows_in"] == shard["rows_kept"] + shard["rows_removed"]
            assert shard["rows_kept"] == pq.read_metadata(results / f"{path}.parquet").num_rows
            assert shard["rows_removed"] == pq.read_metadata(results / f"{path}.removed.parquet").num_rows
        for key in ("rows_in", "rows_kept", "rows_removed", "removed_exact", "removed_near"):
            assert dedup[key] == sum(shard[key] for shard in dedup["shards"].values())
        for path in split_shards(config, kind):  # each dedup shard's kept rows, split
            split = stats(results / path / "stats.json")
            assert split["rows_in"] == dedup["shards"][path.split("/", 2)[2]]["rows_kept"]
            assert split["rows_in"] == sum(split["rows"].values())
            for name, n in split["rows"].items():
                assert pq.read_metadata(results / path / f"{name}.parquet").num_rows == n
    # Choice sources are not deduplicated.
    assert not list(results.glob("dedup/*/demo_idiom_choice"))
    assert not list(results.glob("dedup/signatures/demo_idiom_choice"))


def test_malformed_rows_are_rejected_with_their_reason(dag):
    workdir, _, _ = dag
    rejects = {r["id"] or r["index"]: r["reason"] for r in table(workdir / "results/parsed/planted/0.rejects.parquet")}
    assert rejects == {5: "bad json", 6: "invalid utf-8", "planted:nofield": "missing field 'text'",
                       "planted:empty": "empty field 'text'"}


def test_planted_duplicates_are_removed_and_unrelated_texts_kept(dag):
    workdir, _, originals = dag
    removed = {r["id"]: r for path in (workdir / "results/dedup/pretrain").glob("*/*.removed.parquet")
               for r in table(path)}
    assert removed["planted:a_copy"]["duplicate_of"] == "planted:a"
    assert removed["planted:a_copy"]["reason"] == "exact"
    assert removed["planted:b_near"]["duplicate_of"] == "planted:b"
    assert removed["planted:b_near"]["reason"] == "near"
    kept = {r["id"] for path in (workdir / "results/dedup/pretrain").glob("*/*.parquet")
            if re.fullmatch(r"\d+\.parquet", path.name) for r in table(path)}
    planted = stats(workdir / "results/dedup/pretrain/planted/0.stats.json")  # the planted source's one shard
    assert planted["removed_exact"] >= 1 and planted["removed_near"] >= 1
    assert {"planted:a", "planted:b", "planted:c"} <= kept


def test_held_out_items_appear_in_no_training_file(dag):
    held_out = [r["id"] for r in split_rows(dag, "pretrain", "val") + split_rows(dag, "sft", "eval")
                + split_rows(dag, "finetune", "eval")]
    trained = [r["id"] for r in split_rows(dag, "pretrain", "train") + split_rows(dag, "sft", "train")
               + split_rows(dag, "sft", "dpo_prompts") + split_rows(dag, "finetune", "train")]
    assert held_out and trained
    assert not {item_key(i) for i in held_out} & {item_key(i) for i in trained}
    # The held-out polarity reviews are not in the pretraining text either.
    train_text = {r["text"] for r in split_rows(dag, "pretrain", "train")}
    eval_reviews = [r["prompt"].split("\n", 1)[1] for r in split_rows(dag, "sft", "eval")
                    if r["id"].endswith("#polarity")]
    assert eval_reviews and not train_text & set(eval_reviews)


def test_token_files_hold_every_document(dag):
    workdir, _, _ = dag
    results = workdir / "results"
    meta = stats(results / "tokens/meta.json")
    tokenizer = Tokenizer.from_file(str(results / "tokenizer/tokenizer.json"))
    for split in ("train", "val"):
        m = meta[split]
        assert m["dtype"] == "uint16" and m["vocab_size"] == tokenizer.get_vocab_size()
        assert m["tokens"] * 2 == (results / f"tokens/{split}.bin").stat().st_size
        assert m["tokenizer_sha256"] == hashlib.sha256((results / "tokenizer/tokenizer.json").read_bytes()).hexdigest()
        ids = np.fromfile(results / f"tokens/{split}.bin", dtype=np.uint16)
        docs = np.split(ids, np.flatnonzero(ids == m["eot_id"]) + 1)[:-1]
        rows = split_rows(dag, "pretrain", split)
        assert [tokenizer.decode(d[:-1].tolist()) for d in docs] == [r["text"] for r in rows]
        # Each source's spans (what pretrain.phases' mixtures draw from) hold exactly its documents.
        assert sum(end - start for spans in m["sources"].values() for start, end in spans) == m["tokens"]
        for source, spans in m["sources"].items():
            ids_of = np.concatenate([ids[start:end] for start, end in spans])
            docs_of = np.split(ids_of, np.flatnonzero(ids_of == m["eot_id"]) + 1)[:-1]
            assert [tokenizer.decode(d[:-1].tolist()) for d in docs_of] == [r["text"] for r in rows
                                                                             if r["source"] == source]


def fuzz_strings(n, seed=0):
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x1F300, 0x1FAFF),
              (0x3000, 0x303F), (0xFF00, 0xFFEF), (0x0, 0x1F)]
    for _ in range(n):
        yield "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 40)))
    yield from ["\n", "\t", "  two spaces", "👨‍👩‍👧 family", "𠀀𪛖 rare", "GPT-4o 在 2024 年发布。\n\n换行"]


def test_sft_and_dpo_token_files_count_every_row(dag):
    """Each row of the SFT splits and of the rollout pairs is in the token files or counted as skipped."""
    workdir, _, _ = dag
    results = workdir / "results"
    sha = hashlib.sha256((results / "tokenizer/tokenizer.json").read_bytes()).hexdigest()
    sft = stats(results / "tokens/sft/meta.json")
    assert sft["tokenizer_sha256"] == sha
    for split in ("train", "eval"):
        rows = len(split_rows(dag, "sft", split))
        assert sft[split]["examples"] + sum(sft[split]["skipped"].values()) == rows > 0, split
        offsets = np.load(results / f"tokens/sft/{split}.offsets.npy")
        assert len(offsets) == sft[split]["examples"] + 1 and offsets[-1] == sft[split]["tokens"]
    dpo = stats(results / "tokens/dpo/meta.json")
    assert dpo["tokenizer_sha256"] == sha
    pairs = table(results / "rollouts/pairs.parquet")
    for split in ("train", "eval"):
        rows = sum((p["split"] == "eval") == (split == "eval") for p in pairs)
        assert dpo[split]["pairs"] + sum(dpo[split]["skipped"].values()) == rows, split


def test_built_tokenizer_round_trips_fuzzed_strings(dag):
    workdir, _, _ = dag
    tokenizer = Tokenizer.from_file(str(workdir / "results/tokenizer/tokenizer.json"))
    for s in fuzz_strings(3000):
        assert tokenizer.decode(tokenizer.encode(s).ids, skip_special_tokens=False) == s


def test_the_dpo_model_is_exported_as_gguf_with_an_ollama_modelfile(dag):
    workdir, _, _ = dag
    folder = workdir / "results/dpo"
    reader = GGUFReader(folder / "model.gguf")
    assert reader.fields["general.file_type"].contents() == 1  # MOSTLY_F16: the schema's default dtype
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:len(vocab)] == sorted(vocab, key=vocab.get)
    assert (folder / "Modelfile").read_text().startswith("FROM ./model.gguf\n")


def test_second_run_has_nothing_to_do(dag):
    workdir, _, _ = dag
    run = snakemake(workdir, "-n", TARGET)
    assert run.returncode == 0, run.stderr
    assert "Nothing to be done" in run.stdout + run.stderr


def test_a_moved_project_run_through_another_python_path_has_nothing_to_do(dag, tmp_path):
    """The project's files and the finished run copied to another folder (every mtime kept), and
    Snakemake started through a symlink to this Python's environment: the rules' records hold no
    path to the project, its scripts or the interpreter, so nothing is stale."""
    workdir, _, _ = dag
    moved = copy_tree(tmp_path / "moved")
    shutil.copytree(workdir, moved, symlinks=True, dirs_exist_ok=True)  # results/, .snakemake/, config.yaml
    (tmp_path / "env").symlink_to(sys.prefix, target_is_directory=True)
    python = tmp_path / "env" / Path(sys.executable).relative_to(sys.prefix)
    run = snakemake(moved, "-n", python=python, project=moved)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "Nothing to be done" in output, output[-5000:]
    shown = subprocess.run([python, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True)
    assert shown.stdout.strip() == str(python) != sys.executable  # it really ran as another path


def job_counts(output):
    """The job names of a dry run's "Job stats" table."""
    counts = {}
    for line in output.split("Job stats:", 1)[1].splitlines()[3:]:
        name, count = line.split()
        if name == "total":
            return counts
        counts[name] = int(count)


def test_changed_cleaning_parameter_reruns_cleaning_and_what_follows_only(dag):
    workdir, config, _ = dag
    config = json.loads(json.dumps(config))
    config["clean"]["pretrain"]["min_chars"] += 1
    (workdir / "config.yaml").rename(workdir / "config.orig.yaml")
    try:
        (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        run = snakemake(workdir, "-n", TARGET)
    finally:
        (workdir / "config.orig.yaml").replace(workdir / "config.yaml")
    assert run.returncode == 0, run.stderr
    jobs = job_counts(run.stdout + run.stderr)
    n_shards = sum(s.get("shards", 1) for s in config["sources"].values() if s["kind"] == "pretrain")
    for rule in ("clean_shard", "dedup_signatures", "dedup_filter", "split_pretrain"):  # one job per shard
        assert jobs.get(rule) == n_shards, jobs
    assert jobs.get("dedup_bands") == config["dedup"]["band_jobs"]
    for rule in ("dedup_exact", "dedup_cluster", "dedup_summary", "count_words", "build_tokenizer", "binarize"):
        assert jobs.get(rule) == 1, jobs
    assert "download" not in jobs and "parse" not in jobs and "split_sft" not in jobs
    assert "gather_clean" not in jobs  # dedup reads the clean shards


def job_inputs(output):
    """rule -> the input files of its (first) job in a dry run's output."""
    return {rule: files.split(", ") for rule, files in
            re.findall(r"^(?:local)?rule (\w+):\n    input: (.*)$", output, re.MULTILINE)}


def test_a_changed_tokenizer_makes_the_training_stages_stale(dag, tmp_path):
    """pretrain, sft and dpo read results/tokenizer/ (and copy its files into their model
    folders), so each declares those files as inputs, and a changed tokenizer reruns them,
    and the rules that tokenise their data (binarize, tokenize_sft, tokenize_dpo).

    Run on a copy of the DAG's workdir, so the other tests keep theirs; Snakemake's records in
    .snakemake/ name files by their relative paths, and copying keeps every mtime. The
    tokenizer's bytes change, not only its mtime: Snakemake keeps the checksums of inputs up to
    1 MB and takes a touched file with the same content as unchanged."""
    workdir, _, _ = dag
    copy = tmp_path / "dag"
    shutil.copytree(workdir, copy, symlinks=True)
    run = snakemake(copy, "-n")
    assert run.returncode == 0, run.stderr[-5000:]
    assert "Nothing to be done" in run.stdout + run.stderr  # the copy is as up to date as the DAG
    tokenizer = copy / "results/tokenizer/tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), ensure_ascii=False, indent=1))
    run = snakemake(copy, "-n")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    jobs, inputs = job_counts(output), job_inputs(output)
    for rule in ("binarize", "tokenize_sft", "pretrain", "sft", "rollouts", "tokenize_dpo", "dpo"):
        assert jobs.get(rule) == 1, jobs
    assert jobs.get("eval_stage") == 3 and jobs.get("report") == 1, jobs
    assert not {"download", "parse", "clean_shard", "dedup_signatures", "dedup_cluster", "dedup_filter",
                "count_words", "build_tokenizer"} & set(jobs), jobs
    # Each training stage reads the tokenizer itself, not only through pretrain's model folder.
    tokenizer_files = [f"results/tokenizer/{name}" for name in TOKENIZER_FILES]
    for rule in ("pretrain", "sft", "dpo"):
        assert set(tokenizer_files) <= set(inputs[rule]), (rule, inputs[rule])
    for rule in ("binarize", "tokenize_sft", "tokenize_dpo"):
        assert "results/tokenizer/tokenizer.json" in inputs[rule], (rule, inputs[rule])


def test_a_local_source_file_is_the_input_of_its_download(tmp_path):
    """A file:// source is copied by the download job, which declares the file it reads."""
    local = tmp_path / "corpus" / "news.jsonl"
    local.parent.mkdir()
    local.write_text(json.dumps({"id": "local:0", "text": "长江是亚洲第一长河。"}, ensure_ascii=False) + "\n")
    config = yaml.safe_load((REPO / "tests/tiny.yaml").read_text())
    config["sources"]["local"] = {"kind": "pretrain", "uri": local.as_uri()}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    run = snakemake(tmp_path, "-n", "results/parsed/local/0.parquet")
    assert run.returncode == 0, run.stderr[-5000:]
    assert f"    input: {local}\n    output: results/raw/local/news.jsonl\n" in run.stdout
    local.unlink()  # a missing local file fails before any job runs, naming it
    run = snakemake(tmp_path, "-n", "results/parsed/local/0.parquet")
    assert run.returncode != 0 and "MissingInputException" in run.stdout + run.stderr
    assert str(local) in run.stdout + run.stderr


def test_a_stage_over_several_nodes_asks_slurm_for_them_and_launches_on_each(tmp_path):
    config = yaml.safe_load((REPO / "tests/tiny.yaml").read_text())
    config["pretrain"].update(nproc=4, nodes=2, global_batch=16)  # 2 per micro-batch on each of 8 processes
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    run = snakemake(tmp_path, "-n", "-p", "results/pretrain/model.safetensors")
    assert run.returncode == 0, run.stderr
    job = run.stdout.split("rule pretrain:", 1)[1]
    resources = dict(item.split("=", 1) for item in job.split("resources: ", 1)[1].split("\n", 1)[0].split(", "))
    assert {k: resources.get(k) for k in ("nodes", "tasks", "mpi", "gres", "tasks_per_gpu", "gpu")} == {
        "nodes": "2", "tasks": "2", "mpi": "srun", "gres": "gpu:4", "tasks_per_gpu": "0", "gpu": None}
    assert "-m zhlm.train.launch --nproc-per-node 4 --nodes 2 " in job


def test_misspelled_config_key_fails_naming_the_key(tmp_path):
    config = yaml.safe_load((REPO / "tests/tiny.yaml").read_text())
    config["clean"]["pretrain"]["min_chras"] = config["clean"]["pretrain"].pop("min_chars")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    run = snakemake(tmp_path, "-n")
    assert run.returncode != 0
    assert "min_chras" in run.stdout + run.stderr


@pytest.mark.parametrize("change, message", BROKEN.values(), ids=BROKEN.keys())
def test_a_config_that_cannot_train_fails_before_any_job_naming_its_keys(change, message, tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(broken_config(change), allow_unicode=True, sort_keys=False))
    run = snakemake(tmp_path, "-n")
    output = run.stdout + run.stderr
    assert run.returncode != 0 and f"config: {message}" in output, output[-3000:]
    assert "Job stats" not in output  # no DAG was planned


def test_a_yaml_error_in_the_default_config_names_its_line_and_column(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.yaml").write_text("sources:\n  demo: {kind: pretrain\nmodel: {}\n")
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "-n"], capture_output=True, text=True, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "config: config/config.yaml, line 3, column 6: expected ',' or '}'" in output, output[-3000:]


def test_a_failing_script_leaves_its_traceback_in_its_log(tmp_path):
    """A JSON array cut off mid-record fails the parse job: its log holds the error and where it
    was raised, not only the console."""
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "text": "长江是亚洲第一长河。"}, {"id": "b", "text": ', encoding="utf-8")
    config = {"sources": {"broken": {"kind": "pretrain", "uri": broken.as_uri(), "format": "json"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "results/parsed/broken/0.parquet")
    assert run.returncode != 0
    assert "log: results/logs/parse/broken/0.log" in run.stderr, run.stderr[-3000:]
    log = (tmp_path / "results/logs/parse/broken/0.log").read_text()
    assert "Traceback (most recent call last)" in log and "ValueError: results/raw/broken/broken.json: " in log, log


def test_a_failing_training_job_leaves_its_traceback_in_its_log(dag, tmp_path):
    """The training rules' scripts log to stderr, which the rule copies into the log."""
    workdir, _, _ = dag
    copy = tmp_path / "dag"
    shutil.copytree(workdir, copy, symlinks=True)
    (copy / "results/tokens/meta.json").write_text("{")  # newer than pretrain's outputs, and broken
    run = snakemake(copy, "results/pretrain/model.safetensors")
    assert run.returncode != 0 and "log: results/logs/pretrain.log" in run.stderr, run.stderr[-3000:]
    log = (copy / "results/logs/pretrain.log").read_text()
    assert "Traceback (most recent call last)" in log and "JSONDecodeError" in log, log


def test_every_stage_leaves_a_model_folder_that_transformers_loads_with_the_same_logits(dag):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhlm.model import load_model

    workdir, _, _ = dag
    for stage in ("pretrain", "sft", "dpo"):
        folder = workdir / "results" / stage
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "train_log.csv", "loss.png"):
            assert (folder / name).exists(), (stage, name)
        assert not (folder / "_ckpt/last.pt").exists()
    folder = workdir / "results/dpo"
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "这本书怎么样？"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\n这本书怎么样？<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        ours = load_model(folder).eval()(ids)
        assert torch.allclose(ours, hf(ids).logits, atol=1e-4)


def test_rollout_pairs_come_from_the_dpo_prompts_and_are_counted(dag):
    workdir, config, _ = dag
    results = workdir / "results"
    pairs = table(results / "rollouts/pairs.parquet")
    rollout_stats = stats(results / "rollouts/stats.json")
    prompts = {r["id"]: r for r in split_rows(dag, "sft", "dpo_prompts")}
    assert rollout_stats["prompts"] == min(len(prompts), config["rollouts"]["max_prompts"])
    assert (rollout_stats["pairs"] + rollout_stats["dropped_similar"] + rollout_stats["skipped_too_long"]
            == rollout_stats["prompts"])
    assert len(pairs) == rollout_stats["pairs"]
    for pair in pairs:
        assert pair["chosen"] == prompts[pair["id"]]["response"] and pair["split"] in ("train", "eval")
        assert pair["temperature"] == config["rollouts"]["temperature"]


def test_eval_scores_every_stage_and_writes_the_report(dag):
    workdir, _, _ = dag
    results = workdir / "results/eval"
    for stage in ("pretrain", "sft", "dpo"):
        result = stats(results / f"{stage}.json")
        assert 0 < result["bpc"]["bpc"] and result["unigram_bpc"] > 0
        if stage != "pretrain":
            assert {"polarity", "pinyin", "segmentation"} <= set(result["tasks"])
            assert result["preference"]["n"] > 0
            # The idiom choice set is scored on held-out idioms only.
            held_out = {item_key(r["id"]) for r in split_rows(dag, "pretrain", "val")}
            assert 0 < result["choice"]["demo_idiom_choice"]["n"] <= len(held_out)
            assert result["looping"]["all"]["n"] > 0
    # DPO's implicit reward, against the SFT model, on the same pairs as the preference accuracy.
    assert "implicit_reward" not in stats(results / "sft.json")
    dpo = stats(results / "dpo.json")
    assert dpo["implicit_reward"]["n"] == dpo["preference"]["n"]
    report = (results / "report.md").read_text()
    for stage in ("pretrain", "sft", "dpo"):
        assert stage in report
    # The DPO model with and without the idiom encyclopedia's passages (tiny.yaml: retrieval.docs).
    retrieval = stats(results / "retrieval.json")
    assert retrieval["n"] > 0 and retrieval["documents"] > 0 and retrieval["recall@5"] >= 0.5, retrieval
    assert set(retrieval["char_f1"]) >= {"without", "with"} and "## Retrieval" in report
    summary = stats(results / "summary.json")
    assert summary["pretrain.bpc"] == stats(results / "pretrain.json")["bpc"]["bpc"]
    assert "dpo.implicit_reward.accuracy" in summary and "dpo.looping" in summary
    assert summary["retrieval.recall@1"] == stats(results / "retrieval.json")["recall@1"]


def test_dpo_anchors_its_pairs_with_the_sft_stages_conversations(dag):
    """anchor_weight and unlikelihood_weight (tiny.yaml): DPO read the sft stage's token files and
    logged the anchors' NLL and the unlikelihood of the rejected answers' repeats."""
    workdir, _, _ = dag
    results = workdir / "results"
    assert "anchored by one of the sft stage's" in (results / "logs/dpo.log").read_text()
    with open(results / "dpo/train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["anchor_nll"]) > 0 and float(r["repeat_unlikelihood"]) >= 0 for r in rows)


def test_the_finetune_trains_the_dpo_model_on_its_own_sources_and_scores_before_and_after(dag):
    from zhlm.model import load_model

    workdir, config, _ = dag
    results = workdir / "results"
    # The entity rows feed the finetune only: not the sft stage's splits, its token files, or the tokenizer.
    finetune_rows = {s: split_rows(dag, "finetune", s) for s in ("train", "eval")}
    assert finetune_rows["train"] and all(r["id"].split("#")[1].startswith("ner") for r in finetune_rows["train"])
    assert not any("#ner" in r["id"] for s in ("train", "dpo_prompts", "eval") for r in split_rows(dag, "sft", s))
    meta = stats(results / "tokens/finetune/meta.json")
    assert meta["train"]["examples"] + sum(meta["train"]["skipped"].values()) == len(finetune_rows["train"])
    assert meta["tokenizer_sha256"] == hashlib.sha256((results / "dpo/tokenizer.json").read_bytes()).hexdigest()
    # LoRA (tiny.yaml): the adapter merged into a complete folder that differs from the DPO model it started from.
    assert (results / "finetune/lora/adapter_model.safetensors").exists()
    before, after = load_model(results / "dpo").state_dict(), load_model(results / "finetune").state_dict()
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)
    # sft_mix (tiny.yaml): the sft stage's conversations reached the finetune.
    assert "of the sft stage's" in (results / "logs/finetune.log").read_text()
    # Both models on the same held-out items: the finetune's task, every other task, jieba beside them.
    result = stats(results / "eval/finetune.json")
    assert result["init"] == "results/dpo" and result["finetune_tasks"] == ["entities"]
    for side in ("before", "after"):
        assert {"entities", "polarity", "pinyin"} <= set(result[side]["tasks"]), side
        assert result[side]["bpc"]["bpc"] > 0 and result[side]["choice"]["demo_idiom_choice"]["n"] > 0
    assert result["before"]["tasks"]["pinyin"]["n"] == result["after"]["tasks"]["pinyin"]["n"] > 0
    baseline = result["baseline"]["entities"]
    assert baseline["n"] == min(config["eval"]["max_task_items"], len(finetune_rows["eval"]))
    # jieba on the rows the models were scored on (whether it finds any in so few: tests/test_entities.py)
    expected = jieba_baseline(finetune_rows["eval"], config["eval"]["max_task_items"])
    assert {k: v for k, v in baseline.items() if k != "name"} == json.loads(json.dumps(expected))
    report = (results / "eval/finetune.md").read_text()
    assert "## Entity extraction" in report and "jieba" in report and "## Stage by stage" in report


# --- the same DAG through SLURM ----------------------------------------------

SLURM_ARGS = ("--workflow-profile", str(REPO / "profiles/slurm"),
              # status checks every second instead of the profile's site-friendly pace
              "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1")
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


@pytest.fixture(scope="module")
def slurm_dag(tmp_path_factory):
    """The tiny DAG to the DPO model, every job submitted by the SLURM profile to a real
    single-node cluster started for this test and shut down after it."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as e:
        cluster.stop()
        pytest.skip(f"SLURM cannot start on this machine, so the SLURM profile is NOT tested: {e}")
    workdir = tmp_path_factory.mktemp("slurm_dag")
    try:
        _, _, run = run_dag(workdir, *SLURM_ARGS, "results/dpo/model.safetensors", env=cluster.env)
        yield workdir, run.stdout + run.stderr, cluster
    finally:
        cluster.stop()


def slurm_jobs(cluster):
    """SLURM's view of every job it still remembers: id -> (state, GPUs asked for, resources allocated)."""
    out = subprocess.run(["squeue", "--states=all", "--noheader", "-O", "JobID:|,State:|,tres-per-job:|,tres-alloc:"],
                         env=cluster.env, capture_output=True, text=True, check=True).stdout
    rows = (line.split("|") for line in out.splitlines())
    return {job: (state, gpus, alloc.strip()) for job, state, gpus, alloc in rows}


def test_slurm_profile_runs_every_job_as_a_slurm_job(slurm_dag):
    workdir, output, cluster = slurm_dag
    submitted = SUBMITTED.findall(output)
    planned = job_counts(output)
    assert sum(planned.values()) == len(submitted) > 20
    known = slurm_jobs(cluster)
    logs = workdir / ".snakemake/slurm_logs"
    for slurm_id, log_path in submitted:
        # SLURM still knows the job (MinJobAge) and says it completed; its log is where the profile says.
        state, gpus, alloc = known[slurm_id]
        assert state == "COMPLETED", (slurm_id, log_path, state)
        log = Path(log_path)
        assert log.is_relative_to(logs) and log.name == f"{slurm_id}.log" and log.exists()
        rule = log.relative_to(logs).parts[0].removeprefix("rule_")
        # Model jobs got the GPU the rule asks for (the test node's pseudo-GPU) and the profile's
        # CPUs per GPU; data jobs no GPU and their threads' CPUs.
        if rule in ("pretrain", "sft", "rollouts", "dpo"):
            assert gpus == "gres:gpu:1" and "cpu=8," in alloc, (rule, gpus, alloc)
        else:
            assert gpus == "N/A" and alloc.startswith("cpu=1,") == (rule != "count_words"), (rule, alloc)
    logs_per_rule = {}
    for log in logs.glob("rule_*/**/*.log"):
        rule = log.relative_to(logs).parts[0].removeprefix("rule_")
        logs_per_rule[rule] = logs_per_rule.get(rule, 0) + 1
    assert logs_per_rule == planned


def test_slurm_run_gives_the_local_run_s_artifacts(slurm_dag, dag):
    slurm_dir, _, _ = slurm_dag
    local_dir, _, _ = dag
    compared = 0
    for path in sorted((slurm_dir / "results").rglob("*")):
        relative = path.relative_to(slurm_dir)
        if not path.is_file() or relative.parts[1] in ("logs", "benchmarks"):
            continue
        local = local_dir / relative
        assert local.exists(), relative
        if path.suffix == ".parquet":
            assert pq.read_metadata(path).num_rows == pq.read_metadata(local).num_rows, relative
            assert pq.read_schema(path) == pq.read_schema(local), relative
        elif (path.suffix == ".bin" and not relative.is_relative_to("results/tokens/dpo")) \
                or relative == Path("results/tokenizer/tokenizer.json"):
            # Data stages are deterministic; the DPO pairs' tokens are those of the model's rollouts.
            assert path.read_bytes() == local.read_bytes(), relative
        elif path.suffix == ".safetensors":
            with safe_open(path, "pt") as a, safe_open(local, "pt") as b:
                assert {k: a.get_slice(k).get_shape() for k in a.keys()} == \
                       {k: b.get_slice(k).get_shape() for k in b.keys()}, relative
        compared += 1
    assert compared > 50


def test_preempted_slurm_training_job_is_resubmitted_and_resumes(slurm_dag):
    """SIGTERM to the running pretrain job's steps, as SLURM sends them when it preempts a job
    (GraceTime) or warns of its time limit (the profile's --signal): the job checkpoints and
    fails, the profile's retries resubmit it, and the new SLURM job resumes from the
    checkpoint and finishes."""
    workdir, _, cluster = slurm_dag
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    steps = 300
    config["pretrain"].update(steps=steps, checkpoint_every=5, eval_every=steps, phases=None)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    ckpt = workdir / "results/pretrain/_ckpt/last.pt"
    output = workdir / "preempted.out"
    with open(output, "w") as out:
        run = subprocess.Popen(snakemake_command(workdir, *SLURM_ARGS, "results/pretrain/model.safetensors"),
                               stdout=out, stderr=subprocess.STDOUT, env=cluster.env, cwd=workdir)
        deadline = time.time() + 240
        while not (ckpt.exists() and SUBMITTED.search(output.read_text())) and run.poll() is None:
            assert time.time() < deadline, output.read_text()[-3000:]
            time.sleep(0.2)
        submitted = SUBMITTED.search(output.read_text())
        assert submitted and ckpt.exists(), output.read_text()[-3000:]  # not ended before it was preempted
        first_job = submitted.group(1)
        subprocess.run(["scancel", "--signal=TERM", first_job], env=cluster.env, check=True)
        assert run.wait(timeout=600) == 0, output.read_text()[-5000:]
    submitted = SUBMITTED.findall(output.read_text())
    assert [Path(log).parts[-2] for _, log in submitted] == ["rule_pretrain"] * 2
    (first, first_log), (second, second_log) = submitted
    assert first == first_job and slurm_jobs(cluster)[first][0] == "FAILED"
    stopped = re.search(r"stopped by signal 15 at step (\d+)", Path(first_log).read_text())
    assert stopped and 0 < int(stopped.group(1)) < steps
    assert f"at step {stopped.group(1)}" in Path(second_log).read_text()
    log_rows = (workdir / "results/pretrain/train_log.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in log_rows] == list(range(1, steps + 1))
