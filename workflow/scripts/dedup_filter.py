"""The kept and the removed rows of one clean shard (dedup stage 5)."""
import polars as pl

from zhlm.data.dedup import filter_shard
from zhlm.io import read_parquet, setup_logging, write_json, write_parquet

log = setup_logging(snakemake.log[0])
kept, removed, stats = filter_shard(read_parquet(snakemake.input.rows), pl.scan_parquet(snakemake.input.duplicates),
                                    source_no=snakemake.params.source_no, shard=int(snakemake.wildcards.shard))
write_parquet(kept, snakemake.output.rows)
write_parquet(removed, snakemake.output.removed)
write_json(stats, snakemake.output.stats)
log.info("%s shard %s: %d in, %d kept, %d exact and %d near duplicates removed", snakemake.wildcards.source,
         snakemake.wildcards.shard, stats["rows_in"], stats["rows_kept"], stats["removed_exact"], stats["removed_near"])
