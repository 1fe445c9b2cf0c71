# Data stages: download -> parse (sharded) -> clean (one job per parse shard) -> dedup (dedup.smk) -> split.


rule download:
    input:
        local_source,
    output:
        "results/raw/{source}/{filename}",
    params:
        uri=lambda w: SOURCES[w.source]["uri"],
        sha256=lambda w: SOURCES[w.source].get("sha256"),
    log:
        "results/logs/download/{source}/{filename}.log",
    benchmark:
        "results/benchmarks/download/{source}/{filename}.tsv"
    retries: 2
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/download.py"


# A source with `shards: N` is parsed as N parallel jobs, each streaming its part of the file.
rule parse:
    input:
        lambda w: raw_file(w.source),
    output:
        rows="results/parsed/{source}/{shard}.parquet",
        rejects="results/parsed/{source}/{shard}.rejects.parquet",
        stats="results/parsed/{source}/{shard}.stats.json",
    params:
        kind=lambda w: SOURCES[w.source]["kind"],
        format=lambda w: SOURCES[w.source]["format"],
        templates=lambda w: templates(w.source),
        id_template=lambda w: SOURCES[w.source].get("id"),
        limit=lambda w: SOURCES[w.source].get("limit"),
        shards=lambda w: SOURCES[w.source]["shards"],
    log:
        "results/logs/parse/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/parse/{source}/{shard}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/parse.py"


# One clean job per parse shard. The stats of the parse shards before it give the number
# of rows before this one, so reject indexes point into the whole source's parsed rows.
rule clean_shard:
    input:
        rows="results/parsed/{source}/{shard}.parquet",
        before=lambda w: [f"results/parsed/{w.source}/{i}.stats.json" for i in range(int(w.shard))],
    output:
        rows="results/clean/shards/{source}/{shard}.parquet",
        rejects="results/clean/shards/{source}/{shard}.rejects.parquet",
        stats="results/clean/shards/{source}/{shard}.stats.json",
    params:
        kind=lambda w: SOURCES[w.source]["kind"],
        filters=lambda w: config["clean"][SOURCES[w.source]["kind"]],
    log:
        "results/logs/clean/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/clean/{source}/{shard}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/clean.py"


rule gather_clean:
    input:
        rows=lambda w: clean_shards(w.source),
        rejects=lambda w: [p.replace(".parquet", ".rejects.parquet") for p in clean_shards(w.source)],
        stats=lambda w: [p.replace(".parquet", ".stats.json") for p in clean_shards(w.source)],
    output:
        rows="results/clean/{source}.parquet",
        rejects="results/clean/{source}.rejects.parquet",
        stats="results/clean/{source}.stats.json",
    log:
        "results/logs/gather_clean/{source}.log",
    benchmark:
        "results/benchmarks/gather_clean/{source}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/gather_clean.py"


# One split rule per kind present in the config; each job splits one dedup shard into that
# kind's splits (zhlm.data.split: a hash of the item key, so no job needs to see the others).
for split_kind in kinds():

    rule:
        name:
            f"split_{split_kind}"
        input:
            rows=f"results/dedup/{split_kind}/{{source}}/{{shard}}.parquet",
            # The kind's dedup summary, which checks that its shards' counts add up.
            dedup_stats=f"results/dedup/{split_kind}.stats.json",
        output:
            parts=[f"results/split/{split_kind}/{{source}}/{{shard}}/{name}.parquet" for name in SPLITS[split_kind]],
            stats=f"results/split/{split_kind}/{{source}}/{{shard}}/stats.json",
        params:
            kind=split_kind,
            holdout=config["split"]["holdout"],
            dpo_prompts=config["split"]["dpo_prompts"],
        log:
            f"results/logs/split/{split_kind}/{{source}}/{{shard}}.log",
        benchmark:
            f"results/benchmarks/split/{split_kind}/{{source}}/{{shard}}.tsv"
        conda:
            "../../envs/zhlm.yaml"
        script:
            "../scripts/split.py"
