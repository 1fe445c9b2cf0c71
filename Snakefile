# zhlm: raw corpus -> cleaned, deduplicated, split text -> tokenizer -> token ids
# -> pretrain -> SFT -> DPO rollouts -> DPO -> eval, and the DPO model as GGUF. See README.md.
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from zhlm.config import ConfigError, check_yaml_file, config_errors

min_version("8.0")

# A --configfile replaces the demo config instead of being merged into it.
if not workflow.overwrite_configfiles:
    # Snakemake's loader says only "not valid JSON or YAML"; this names the file, line and
    # column. (A --configfile Snakemake reads before this file runs; its --verbose says where.)
    try:
        check_yaml_file("config/config.yaml")
    except ConfigError as e:
        raise WorkflowError(f"config: {e}")

    configfile: "config/config.yaml"


# Each key by the schema (types, ranges, unknown keys), then the rules between keys.
validate(config, "workflow/schemas/config.schema.yaml")
if errors := config_errors(config):
    raise WorkflowError("\n".join(f"config: {error}" for error in errors))


include: "workflow/rules/common.smk"
wildcard_constraints:
    source="|".join(re.escape(name) for name in SOURCES),
    kind="pretrain|sft|dpo|finetune",
    shard=r"\d+",
    band_job=r"\d+",


include: "workflow/rules/data.smk"
include: "workflow/rules/dedup.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/export.smk"


# Its own target, not the default one (README: snakemake results/eval/finetune.md).
if FINETUNE_SOURCES:

    include: "workflow/rules/finetune.smk"


rule all:
    default_target: True
    input:
        model_folder("dpo"),
        "results/dpo/loss.png",
        "results/eval/report.md",
        rules.export_gguf.output,
