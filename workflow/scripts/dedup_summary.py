"""A kind's dedup counts: its shards' added up, each shard's, and the cluster job's."""
from pathlib import Path

from zhlm.data.dedup import Params, summarise
from zhlm.io import read_json, setup_logging, write_json

log = setup_logging(snakemake.log[0])
# results/dedup/{kind}/{source}/{shard}.stats.json -> "{source}/{shard}"
shards = {"/".join(Path(p).parts[-2:]).removesuffix(".stats.json"): read_json(p) for p in snakemake.input.shards}
stats = summarise(shards, read_json(snakemake.input.clusters), Params(**snakemake.params.settings))
write_json(stats, snakemake.output[0])
log.info("%s: %d in, %d kept, %d exact and %d near duplicates removed", snakemake.wildcards.kind,
         stats["rows_in"], stats["rows_kept"], stats["removed_exact"], stats["removed_near"])
