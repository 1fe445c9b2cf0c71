# zhlm: raw corpus -> cleaned, deduplicated, split text -> tokenizer -> token ids
# -> pretrain -> SFT -> DPO rollouts -> DPO -> eval. See README.md.
from snakemake.utils import min_version, validate

min_version("8.0")

# A --configfile replaces the demo config instead of being merged into it.
if not workflow.overwrite_configfiles:
    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
wildcard_constraints:
    source="|".join(re.escape(name) for name in SOURCES),
    kind="pretrain|sft|dpo",
    shard=r"\d+",
    band_job=r"\d+",


include: "workflow/rules/data.smk"
include: "workflow/rules/dedup.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/eval.smk"


rule all:
    default_target: True
    input:
        rules.dpo.output,
        "results/eval/report.md",
