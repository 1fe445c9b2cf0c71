"""Checks of the workflow's config that its JSON schema (workflow/schemas/config.schema.yaml)
cannot express: the Snakefile runs them at start-up, so a config that cannot train fails
before any job runs, naming its keys, instead of when a stage starts hours later.
"""
from __future__ import annotations

import os

import yaml

TRAINING_STAGES = ("pretrain", "sft", "dpo")
FINETUNE_KEYS = ("init", "sources")  # the finetune section's own keys; the rest are training settings


class ConfigError(ValueError):
    """A config file that cannot be read, or a config that cannot train; the message says where."""


def check_yaml_file(path: str | os.PathLike) -> None:
    """Raise ConfigError naming the file, line and column of a YAML syntax error in `path`.

    Snakemake's own loader says only that a config file "is not valid JSON or YAML". A missing
    file is left to whoever reads it to report."""
    try:
        with open(path, encoding="utf-8") as f:
            yaml.safe_load(f)
    except FileNotFoundError:
        return
    except yaml.MarkedYAMLError as e:
        raise ConfigError(yaml_error_message(path, e)) from e


def yaml_error_message(path: str | os.PathLike, error: yaml.MarkedYAMLError) -> str:
    """'<path>, line L, column C: <problem>', and what the parser was reading, where it says."""
    mark = error.problem_mark or error.context_mark
    message = f"{path}, line {mark.line + 1}, column {mark.column + 1}: {error.problem or error.context}"
    if error.context and error.problem and error.context_mark:
        message += f" ({error.context} from line {error.context_mark.line + 1}, column {error.context_mark.column + 1})"
    return message


def config_errors(config: dict) -> list[str]:
    """What makes a config that its schema accepts (defaults filled in) impossible to train, one
    message per broken rule, each naming its keys and their values."""
    pretrain_sources = [name for name, source in config["sources"].items() if source["kind"] == "pretrain"]
    stages = [error for stage in TRAINING_STAGES for error in stage_errors(stage, config[stage], config["model"])]
    return (model_shape_errors(config["model"]) + stages + phase_errors(config["pretrain"], pretrain_sources)
            + retrieval_errors(config) + finetune_errors(config) + rollout_errors(config))


def phase_errors(settings: dict, sources: list[str] | None = None) -> list[str]:
    """pretrain.phases (zhlm.train.phases): their steps add up to pretrain.steps, and each mixture
    gives positive weights to sources that exist (pretrain sources of the config, where
    `sources` names them)."""
    phases = settings.get("phases")
    if not phases:
        return []
    errors = []
    steps = [phase["steps"] for phase in phases]
    if sum(steps) != settings["steps"]:
        errors.append(f"pretrain.phases' steps add up to {sum(steps)} ({' + '.join(map(str, steps))}), not "
                      f"pretrain.steps ({settings['steps']}): set pretrain.steps to their sum")
    for k, phase in enumerate(phases):
        if phase.get("mixture") == {}:
            errors.append(f"pretrain.phases[{k}].mixture is empty: weigh at least one source (null: every source "
                          "by its tokens)")
        for name, weight in (phase.get("mixture") or {}).items():
            if sources is not None and name not in sources:
                errors.append(f"pretrain.phases[{k}].mixture names {name!r}, which is not a pretrain source of the "
                              f"config: one of {', '.join(sources)}")
            if not weight > 0:
                errors.append(f"pretrain.phases[{k}].mixture.{name} ({weight}) must be a positive weight")
    return errors


def finetune_settings(finetune: dict) -> dict:
    """The training settings of the finetune section (TrainConfig fields): all but its own keys."""
    return {key: value for key, value in finetune.items() if key not in FINETUNE_KEYS}


def finetune_errors(config: dict) -> list[str]:
    """A finetune trains on sft sources of the config, in batches that split evenly; a model folder
    of this run (results/...) has the config's context window, another is checked when it loads."""
    finetune = config.get("finetune") or {}
    if not finetune.get("sources"):
        return []
    sft = [name for name, source in config["sources"].items() if source["kind"] == "sft"]
    errors = [f"finetune.sources: {name!r} must name an sft source of the config: one of {', '.join(sft)}"
              for name in finetune["sources"] if name not in sft]
    if finetune["init"].startswith("results/"):
        model = config["model"]
    else:  # another run's model: its context is checked when it loads, and this run's text is not its tokens
        model = {"max_position_embeddings": float("inf")}
        for key in ("pretrain_mix", "sft_mix"):
            if finetune[key]:
                errors.append(f"finetune.{key} needs finetune.init in this run's results/ (not "
                              f"{finetune['init']!r}): the text it mixes in has this run's tokenizer")
    return errors + stage_errors("finetune", finetune_settings(finetune), model)


def rollout_errors(config: dict) -> list[str]:
    """Rollouts answer the DPO prompts of sft sources that the sft stage trains on (not the finetune's)."""
    finetune = (config.get("finetune") or {}).get("sources") or []
    sft = [name for name, source in config["sources"].items() if source["kind"] == "sft" and name not in finetune]
    return [f"rollouts.sources: {name!r} must name an sft source of the sft stage: one of {', '.join(sft)}"
            for name in config["rollouts"].get("sources", []) if name not in sft]


def retrieval_errors(config: dict) -> list[str]:
    """The retrieval eval's documents are the texts of a pretrain source of the config."""
    docs = config.get("retrieval", {}).get("docs")
    pretrain = [name for name, source in config["sources"].items() if source["kind"] == "pretrain"]
    if docs is None or docs in pretrain:
        return []
    return [f"retrieval.docs ({docs!r}) must name a pretrain source of the config: one of {', '.join(pretrain)}"]


def model_shape_errors(model: dict) -> list[str]:
    """The attention heads split the hidden size, the key-value heads are shared by equal groups
    of heads, and RoPE rotates pairs of a head's dimensions."""
    hidden, heads, kv_heads = model["hidden_size"], model["num_attention_heads"], model["num_key_value_heads"]
    errors = []
    if hidden % heads:
        errors.append(f"model.hidden_size ({hidden}) must be divisible by model.num_attention_heads ({heads})")
    elif hidden // heads % 2:
        errors.append(f"model.hidden_size / model.num_attention_heads ({hidden} / {heads} = {hidden // heads}) "
                      "is the size of an attention head, which must be even: RoPE rotates pairs of its dimensions")
    if heads % kv_heads:
        errors.append(f"model.num_attention_heads ({heads}) must be divisible by "
                      f"model.num_key_value_heads ({kv_heads})")
    return errors


def stage_errors(stage: str, settings: dict, model: dict) -> list[str]:
    """A training stage's windows fit the model's context (positions past it have no RoPE table
    and were never trained), its batch splits evenly over processes and micro-batches, and only
    the stages that start from a trained model (sft, dpo) train a LoRA adapter."""
    errors = []
    if stage == "pretrain" and settings.get("lora") is not None:
        errors.append("pretrain.lora must be null: LoRA adapts a trained model (sft, dpo), and pretraining "
                      "trains every weight from scratch")
    for key in ("anchor_weight", "unlikelihood_weight"):
        if stage != "dpo" and settings.get(key):
            errors.append(f"{stage}.{key} must be 0: it weighs a term of DPO's loss")
    if stage != "finetune" and settings.get("sft_mix"):
        errors.append(f"{stage}.sft_mix must be 0: mixing in the sft stage's conversations is the finetune's")
    if settings.get("pretrain_mix", 0) + settings.get("sft_mix", 0) >= 1:
        errors.append(f"{stage}.pretrain_mix ({settings['pretrain_mix']}) + {stage}.sft_mix ({settings['sft_mix']}) "
                      "must be below 1: the rest are the stage's own examples")
    if stage != "pretrain" and settings.get("phases") is not None:
        errors.append(f"{stage}.phases must be null: phases (a data mixture and learning-rate shape per part "
                      "of the run) are pretraining's")
    seq_len, context = settings["seq_len"], model["max_position_embeddings"]
    if seq_len > context:
        errors.append(f"{stage}.seq_len ({seq_len}) must not exceed model.max_position_embeddings ({context}), "
                      "the model's context window")
    batch, micro, nproc, nodes = (settings[k] for k in ("global_batch", "micro_batch", "nproc", "nodes"))
    if batch % (micro * nproc * nodes):
        errors.append(f"{stage}.global_batch ({batch}) must be divisible by {stage}.micro_batch × {stage}.nproc × "
                      f"{stage}.nodes ({micro} × {nproc} × {nodes} = {micro * nproc * nodes})")
    return errors
