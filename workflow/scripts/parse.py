"""Parse one shard of a raw source into the unified row schema, as a stream; malformed
records go to the rejects file."""
from zhlm.data.formats import parse_to_parquet
from zhlm.io import setup_logging, write_json

log = setup_logging(snakemake.log[0])
p, w = snakemake.params, snakemake.wildcards
stats = parse_to_parquet(
    snakemake.input[0], p.format, snakemake.output.rows, snakemake.output.rejects, source=w.source,
    kind=p.kind, templates=p.templates, id_template=p.id_template, limit=p.limit,
    shard=int(w.shard), n_shards=p.shards)
write_json(stats, snakemake.output.stats)
log.info("%s shard %s of %d: %d rows kept, %d rejected %s", w.source, w.shard, p.shards,
         stats["rows_kept"], stats["rows_rejected"], stats["reasons"])
