"""Rows of a kind whose normalised text an earlier row has (dedup stage 2), from the digests of every shard."""
import polars as pl

from zhlm.data.dedup import exact_duplicates
from zhlm.io import setup_logging, write_parquet

log = setup_logging(snakemake.log[0])
exact = exact_duplicates(pl.scan_parquet(list(snakemake.input)))
write_parquet(exact.to_arrow(), snakemake.output[0])
log.info("%s: %d exact duplicates", snakemake.wildcards.kind, len(exact))
