"""Clean one shard of a parsed source."""
from zhlm.data.clean import clean_shard
from zhlm.io import read_parquet, setup_logging, write_json, write_parquet

log = setup_logging(snakemake.log[0])
kept, rejects, stats = clean_shard(
    read_parquet(snakemake.input[0]), snakemake.params.kind,
    shard=int(snakemake.wildcards.shard), n_shards=snakemake.params.shards, **snakemake.params.filters)
write_parquet(kept, snakemake.output.rows)
write_parquet(rejects, snakemake.output.rejects)
write_json(stats, snakemake.output.stats)
log.info("%s shard %s: %d kept, %d rejected %s", snakemake.wildcards.source, snakemake.wildcards.shard,
         stats["rows_kept"], stats["rows_rejected"], stats["reasons"])
