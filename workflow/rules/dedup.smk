# Dedup in stages over shards (zhlm.data.dedup): MinHash signatures per clean shard; exact
# digests, and candidate pairs per group of LSH bands, over all shards of a kind; one cluster
# job per kind that decides what goes; a filter job per shard; a summary per kind. Rows of
# every source of a kind are compared together; choice sources are not deduplicated.


rule dedup_signatures:
    input:
        "results/clean/shards/{source}/{shard}.parquet",
    output:
        "results/dedup/signatures/{source}/{shard}.parquet",
    params:
        kind=lambda w: SOURCES[w.source]["kind"],
        source_no=lambda w: dedup_source_no(w.source),
        settings=dedup_params("ngram", "num_perm", "threshold", "short_chars", "short_threshold"),
    log:
        "results/logs/dedup_signatures/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/dedup_signatures/{source}/{shard}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/dedup_signatures.py"


rule dedup_exact:
    input:
        lambda w: dedup_signatures(w.kind),
    output:
        "results/dedup/{kind}/exact.parquet",
    log:
        "results/logs/dedup_exact/{kind}.log",
    benchmark:
        "results/benchmarks/dedup_exact/{kind}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/dedup_exact.py"


rule dedup_bands:
    input:
        signatures=lambda w: dedup_signatures(w.kind),
        exact="results/dedup/{kind}/exact.parquet",
    output:
        "results/dedup/{kind}/bands/{band_job}.pairs.parquet",
    params:
        band_jobs=config["dedup"]["band_jobs"],
    log:
        "results/logs/dedup_bands/{kind}/{band_job}.log",
    benchmark:
        "results/benchmarks/dedup_bands/{kind}/{band_job}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/dedup_bands.py"


rule dedup_cluster:
    input:
        signatures=lambda w: dedup_signatures(w.kind),
        exact="results/dedup/{kind}/exact.parquet",
        pairs=lambda w: dedup_pairs(w.kind),
    output:
        duplicates="results/dedup/{kind}/duplicates.parquet",
        stats="results/dedup/{kind}/duplicates.stats.json",
    params:
        settings=dedup_params("num_perm", "threshold", "short_chars", "short_threshold", "short_similarity"),
    log:
        "results/logs/dedup_cluster/{kind}.log",
    benchmark:
        "results/benchmarks/dedup_cluster/{kind}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/dedup_cluster.py"


rule dedup_filter:
    input:
        rows="results/clean/shards/{source}/{shard}.parquet",
        duplicates=lambda w: dedup_duplicates(w.kind, w.source),
    output:
        rows="results/dedup/{kind}/{source}/{shard}.parquet",
        removed="results/dedup/{kind}/{source}/{shard}.removed.parquet",
        stats="results/dedup/{kind}/{source}/{shard}.stats.json",
    params:
        source_no=lambda w: dedup_source_no(w.source),
    log:
        "results/logs/dedup_filter/{kind}/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/dedup_filter/{kind}/{source}/{shard}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/dedup_filter.py"


rule dedup_summary:
    input:
        shards=lambda w: [p.replace(".parquet", ".stats.json") for p in dedup_shards(w.kind)],
        clusters="results/dedup/{kind}/duplicates.stats.json",
    output:
        "results/dedup/{kind}.stats.json",
    params:
        settings=dedup_params("ngram", "num_perm", "threshold", "short_chars", "short_threshold",
                              "short_similarity"),
    log:
        "results/logs/dedup_summary/{kind}.log",
    benchmark:
        "results/benchmarks/dedup_summary/{kind}.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/dedup_summary.py"
