"""Verify a kind's candidate pairs and decide which rows go, and as duplicates of which (dedup stage 4)."""
import polars as pl

from zhlm.data.dedup import Params, near_duplicates
from zhlm.io import read_parquet, setup_logging, write_json, write_parquet

log = setup_logging(snakemake.log[0])
inp = snakemake.input
duplicates, stats = near_duplicates(pl.scan_parquet(list(inp.signatures)), pl.from_arrow(read_parquet(inp.exact)),
                                    pl.scan_parquet(list(inp.pairs)), Params(**snakemake.params.settings))
write_parquet(duplicates.to_arrow(), snakemake.output.duplicates)
write_json(stats, snakemake.output.stats)
log.info("%s: %s", snakemake.wildcards.kind, stats)
