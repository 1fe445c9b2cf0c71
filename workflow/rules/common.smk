# Helpers shared by the workflow files: which sources exist, and where their files go.
import json
import os
import re
import shlex
import sys

from zhlm.config import finetune_settings
from zhlm.data.fetch import file_name, local_file
from zhlm.data.schema import TEMPLATE_FIELDS
from zhlm.data.split import SPLITS
from zhlm.io import ADAPTER_FILES, MODEL_FILES, TOKENIZER_FILES
from zhlm.tokenizer.conversations import BY_ID_FILE, TOKEN_FILES

SOURCES = config["sources"]
# The sft sources a finetune trains on (finetune.smk): deduplicated, split and tokenised as a
# kind of their own, "finetune", so that they neither feed the sft stage nor change its data.
FINETUNE_SOURCES = config["finetune"]["sources"]


def kind_of(source):
    """The kind a source's rows are deduplicated, split and tokenised with: its own, or finetune."""
    return "finetune" if source in FINETUNE_SOURCES else SOURCES[source]["kind"]


def sources_of(kind):
    return [name for name in SOURCES if kind_of(name) == kind]


def kinds():
    return [kind for kind in SPLITS if sources_of(kind)]


def raw_file(source):
    """results/raw/{source}/<the file name its URI downloads to>."""
    return f"results/raw/{source}/{file_name(SOURCES[source]['uri'])}"


def local_source(wildcards):
    """The local file a file:// source is copied from (none for other sources): download's input."""
    path = local_file(SOURCES[wildcards.source]["uri"])
    return [str(path)] if path else []


def templates(source):
    """The field templates a source declares (only those it sets)."""
    return {f: SOURCES[source][f] for f in TEMPLATE_FIELDS if f in SOURCES[source]}


def clean_shards(source):
    return [f"results/clean/shards/{source}/{i}.parquet" for i in range(SOURCES[source]["shards"])]


def shards_of(kind):
    """(source, shard) of every shard of a kind's sources: parse, clean, the dedup signatures and
    filter, and the split each run one job per shard."""
    return [(s, i) for s in sources_of(kind) for i in range(SOURCES[s]["shards"])]


def split_files(kind, name):
    """The parquet files of one split of a kind (for example sft, train), one per shard, in
    source and shard order: every stage after the split reads a split as this list."""
    return [f"results/split/{kind}/{s}/{i}/{name}.parquet" for s, i in shards_of(kind)]


def rollout_prompt_files():
    """The dpo_prompts split of rollouts.sources, or of every sft source."""
    chosen = config["rollouts"]["sources"] or sources_of("sft")
    return [path for path, (source, _) in zip(split_files("sft", "dpo_prompts"), shards_of("sft")) if source in chosen]


def tokenizer_training_text():
    """Every training split but the finetune's (which trains a model that has its tokenizer): the
    tokenizer never sees held-out text."""
    return [f for kind in kinds() if kind != "finetune" for f in split_files(kind, "train")]


def tokenizer_files():
    """build_tokenizer's outputs that a training stage reads: tokenizer.json, and the files
    save_pretrained copies into the stage's model folder (zhlm.io.TOKENIZER_FILES)."""
    files = [f for f in rules.build_tokenizer.output if os.path.basename(f) in TOKENIZER_FILES]
    assert len(files) == len(TOKENIZER_FILES), files
    return files


def folder(files):
    """The one folder holding `files` (a path or a list of paths): what a script is given
    when it reads or writes a whole folder."""
    folders = {os.path.dirname(f) for f in ([files] if isinstance(files, str) else files)}
    assert len(folders) == 1, f"not one folder: {sorted(folders)}"
    return folders.pop()


def folder_options(**files):
    """`--flag FOLDER` for each flag (underscores as dashes) whose files are given, the folder
    holding them: an optional input's option whole or not at all, since an empty argument does
    not survive the launcher."""
    return " ".join(f"--{flag.replace('_', '-')} {shlex.quote(folder(paths))}" for flag, paths in files.items()
                    if paths)


def conversation_files(folder, *prefixes, by_id=()):
    """The token files of conversations under `folder` (zhlm.tokenizer.conversations), one set per
    prefix, and meta.json; prefixes in `by_id` also have their order by row id."""
    return [f"{folder}/{prefix}.{suffix}" for prefix in prefixes
            for suffix in TOKEN_FILES + ((BY_ID_FILE,) if prefix in by_id else ())] + [f"{folder}/meta.json"]


# --- model stages -----------------------------------------------------------

# The interpreter and the folder of the scripts that the training rules' shell commands run
# reach them as environment variables, set wherever this file is parsed: by the Snakemake that
# runs the job (on a cluster, the one in the job). Snakemake records a rule's params and its
# shell command's template, and these paths are no part of a result: a copied or moved project,
# another path to the same Python (a symlinked venv) or a node that mounts the project elsewhere
# is no reason to retrain.
os.environ.update(ZHLM_PYTHON=sys.executable, ZHLM_SCRIPTS=os.path.join(workflow.basedir, "workflow", "scripts"))


def model_folder(stage):
    """The files of a stage's Hugging Face model folder (loss.png is declared apart, for the report)."""
    return multiext(f"results/{stage}/", *MODEL_FILES)


def lora_stages():
    """The stages that train a LoRA adapter (their `lora` setting): each writes it to
    results/STAGE/lora/, and merge_lora merges it into the stage's model folder."""
    stages = ("sft", "dpo", "finetune") if FINETUNE_SOURCES else ("sft", "dpo")
    return [stage for stage in stages if config[stage]["lora"] is not None]


def trained_dir(stage):
    """Where a training stage writes: its model folder, or with LoRA its adapter's folder."""
    return f"results/{stage}/lora" if stage in lora_stages() else f"results/{stage}"


def trained_files(stage):
    """The files a training stage writes there (loss.png is declared apart, for the report)."""
    return multiext(f"{trained_dir(stage)}/", *ADAPTER_FILES) if stage in lora_stages() else model_folder(stage)


def lora_base(stage):
    """The model a stage's adapter was trained on: the stage's own first input."""
    if stage == "finetune":
        return rules.finetune.input.init
    return {"sft": rules.sft.input.init, "dpo": rules.dpo.input.sft}[stage]


def lora_tokenizer(stage):
    """The tokenizer files of a stage's merged folder: the run's, or those of the folder the
    finetune started from."""
    return finetune_init_files(TOKENIZER_FILES) if stage == "finetune" else tokenizer_files()


# What the finetune's starting folder must hold: the model and the tokenizer it was trained with.
FINETUNE_INIT_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)


def finetune_init_files(names=FINETUNE_INIT_FILES):
    """Files of the model folder the finetune starts from (finetune.init): a stage's folder of this
    run, which its rule makes, or any other, which must exist."""
    return [f"{config['finetune']['init'].rstrip('/')}/{name}" for name in names]


def launcher(stage):
    """The arguments of zhlm.train.launch for a stage, which starts its training script with
    python, torchrun, or torchrun on each SLURM node."""
    settings = config[stage]
    return f"--nproc-per-node {settings['nproc']} --nodes {settings['nodes']}"


def gpus(stage):
    """GPUs a model job of this stage (pretrain, sft, dpo, rollouts, eval) asks for: one per
    process (training stages may run several), none when its device is cpu."""
    settings = config[stage]
    return 0 if settings["device"] == "cpu" else settings.get("nproc", 1)


def training_resources(stage):
    """Resources of a training job. `gpu` is counted by local runs (profiles/default) and
    requested from SLURM (profiles/slurm). A job over several nodes runs its shell once in the
    batch script (the plugin's `mpi` path), and the launcher's srun starts torchrun on each node."""
    nodes, gpus_per_node = config[stage]["nodes"], gpus(stage)
    if nodes == 1:
        return {"gpu": gpus_per_node}
    resources = {"nodes": nodes, "tasks": nodes, "mpi": "srun"}
    if gpus_per_node:  # GPUs per node (gres), and no task per GPU: torchrun starts those
        resources |= {"gres": f"gpu:{gpus_per_node}", "tasks_per_gpu": 0}
    return resources


def eval_inputs(wildcards):
    """What a stage is scored on: held-out text for all; tasks, pairs and choice sets after SFT;
    and for DPO the SFT model, its reference."""
    inputs = {"model": model_folder(wildcards.stage), "val": split_files("pretrain", "val"),
              "train": split_files("pretrain", "train")}
    if wildcards.stage != "pretrain":
        inputs["tasks"] = split_files("sft", "eval")
        inputs["pairs"] = ["results/rollouts/pairs.parquet"] + (
            split_files("dpo", "eval") if sources_of("dpo") else [])
        inputs["choice"] = [f"results/clean/{s}.parquet" for s in sources_of("choice")]
    if wildcards.stage == "dpo":  # the reference of DPO's implicit reward
        inputs["reference"] = model_folder("sft")
    return inputs


# --- dedup (zhlm.data.dedup): signatures per clean shard -> exact digests and band pairs per
# kind -> one cluster job per kind -> kept and removed rows per shard -------------------------

def dedup_signatures(kind):
    return [f"results/dedup/signatures/{s}/{i}.parquet" for s, i in shards_of(kind)]


def dedup_pairs(kind):
    return [f"results/dedup/{kind}/bands/{j}.pairs.parquet" for j in range(config["dedup"]["band_jobs"])]


def dedup_shards(kind):
    """The kept rows of every clean shard of the kind's sources: what the split reads, shard by shard."""
    return [f"results/dedup/{kind}/{s}/{i}.parquet" for s, i in shards_of(kind)]


def dedup_duplicates(kind, source):
    """The removed rows of a kind, which a shard of one of its sources is filtered by."""
    if kind_of(source) != kind:
        raise ValueError(f"source {source} is of kind {kind_of(source)}, not {kind}")
    return f"results/dedup/{kind}/duplicates.parquet"


def dedup_source_no(source):
    """A source's number among the sources of its kind: the high bits of its rows' ptr."""
    return sources_of(kind_of(source)).index(source)


def dedup_params(*keys):
    """The dedup settings that change a stage's result."""
    return {key: config["dedup"][key] for key in keys}
