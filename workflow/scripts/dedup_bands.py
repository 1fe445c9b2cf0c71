"""Candidate pairs of one group of LSH bands over every shard of a kind (dedup stage 3)."""
import polars as pl
import pyarrow.parquet as pq

from zhlm.data.dedup import band_columns, band_groups, candidate_pairs
from zhlm.io import setup_logging, write_parquet

log = setup_logging(snakemake.log[0])
paths = list(snakemake.input.signatures)
bands = band_groups(band_columns(pq.read_schema(paths[0]).names), snakemake.params.band_jobs)[
    int(snakemake.wildcards.band_job)]
pairs = candidate_pairs(pl.scan_parquet(paths), pl.scan_parquet(snakemake.input.exact), bands)
write_parquet(pairs.to_arrow(), snakemake.output[0])
log.info("%s bands %s: %d candidate pairs", snakemake.wildcards.kind, bands, len(pairs))
