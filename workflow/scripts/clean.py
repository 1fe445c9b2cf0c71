"""Clean one parse shard of a source."""
from zhlm.data.clean import clean_table
from zhlm.io import read_json, read_parquet, setup_logging, write_json, write_parquet

log = setup_logging(snakemake.log[0])
rows_before = sum(read_json(p)["rows_kept"] for p in snakemake.input.before)
kept, rejects, stats = clean_table(
    read_parquet(snakemake.input.rows), snakemake.params.kind, index_offset=rows_before,
    **snakemake.params.filters)
write_parquet(kept, snakemake.output.rows)
write_parquet(rejects, snakemake.output.rejects)
write_json(stats, snakemake.output.stats)
log.info("%s shard %s: %d kept, %d rejected %s", snakemake.wildcards.source, snakemake.wildcards.shard,
         stats["rows_kept"], stats["rows_rejected"], stats["reasons"])
