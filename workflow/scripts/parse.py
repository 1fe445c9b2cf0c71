"""Read one raw source into the unified row schema; malformed records go to the rejects file."""
from zhlm.data.formats import parse_source
from zhlm.io import setup_logging, write_json, write_parquet

log = setup_logging(snakemake.log[0])
p = snakemake.params
rows, rejects, stats = parse_source(
    snakemake.input[0], p.format, source=snakemake.wildcards.source, kind=p.kind,
    templates=p.templates, id_template=p.id_template, limit=p.limit)
write_parquet(rows, snakemake.output.rows)
write_parquet(rejects, snakemake.output.rejects)
write_json(stats, snakemake.output.stats)
log.info("%s: %d rows kept, %d rejected %s", snakemake.wildcards.source,
         stats["rows_kept"], stats["rows_rejected"], stats["reasons"])
