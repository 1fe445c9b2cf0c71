"""Remove exact and near duplicates across all cleaned sources of one kind."""
from zhlm.data.dedup import dedup_table
from zhlm.io import read_parquets, setup_logging, write_json, write_parquet

log = setup_logging(snakemake.log[0])
p = snakemake.params
kept, removed, stats = dedup_table(
    read_parquets(snakemake.input), snakemake.wildcards.kind,
    ngram=p.ngram, num_perm=p.num_perm, threshold=p.threshold, processes=snakemake.threads)
write_parquet(kept, snakemake.output.rows)
write_parquet(removed, snakemake.output.removed)
write_json(stats, snakemake.output.stats)
log.info("%s: %d in, %d kept, %d exact and %d near duplicates removed", snakemake.wildcards.kind,
         stats["rows_in"], stats["rows_kept"], stats["removed_exact"], stats["removed_near"])
