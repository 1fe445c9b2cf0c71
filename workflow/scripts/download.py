"""Fetch one source into results/raw/ (a demo: source is written from the package files)."""
from zhlm.data.fetch import download
from zhlm.io import setup_logging

log = setup_logging(snakemake.log[0])
download(snakemake.params.uri, snakemake.output[0], sha256=snakemake.params.sha256)
log.info("%s -> %s", snakemake.params.uri, snakemake.output[0])
