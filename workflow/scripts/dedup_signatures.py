"""MinHash signatures, digests and LSH band keys of one clean shard (dedup stage 1)."""
from zhlm.data.dedup import Params, signature_table
from zhlm.io import read_parquet, setup_logging, write_parquet

log = setup_logging(snakemake.log[0])
p = snakemake.params
table = signature_table(read_parquet(snakemake.input[0]), p.kind, Params(**p.settings),
                        source_no=p.source_no, shard=int(snakemake.wildcards.shard))
write_parquet(table, snakemake.output[0])
log.info("%s shard %s: %d signatures", snakemake.wildcards.source, snakemake.wildcards.shard, table.num_rows)
