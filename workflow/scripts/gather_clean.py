"""Concatenate the cleaned shards of one source, and add up their stats."""
from zhlm.data.schema import merge_stats
from zhlm.io import concat_parquet, read_json, setup_logging, write_json

log = setup_logging(snakemake.log[0])
concat_parquet(snakemake.input.rows, snakemake.output.rows)
concat_parquet(snakemake.input.rejects, snakemake.output.rejects)
stats = merge_stats([read_json(p) for p in snakemake.input.stats])
write_json(stats, snakemake.output.stats)
log.info("%s: %d kept, %d rejected", snakemake.wildcards.source, stats["rows_kept"], stats["rows_rejected"])
