"""Split one shard of deduplicated rows into train and held-out sets by a hash of the item id."""
from pathlib import Path

from zhlm.data.split import split_table
from zhlm.io import read_parquet, setup_logging, write_json, write_parquet

log = setup_logging(snakemake.log[0])
p = snakemake.params
parts, stats = split_table(read_parquet(snakemake.input.rows), p.kind, holdout=p.holdout, dpo_prompts=p.dpo_prompts)
for path in snakemake.output.parts:
    write_parquet(parts[Path(path).stem], path)
write_json(stats, snakemake.output.stats)
log.info("%s %s/%s: %s", p.kind, snakemake.wildcards.source, snakemake.wildcards.shard, stats["rows"])
