"""The SFT model answers the DPO prompts; its answers become the rejected side of preference pairs."""
from zhlm.io import setup_logging, write_json, write_parquet
from zhlm.train.rollouts import run

log = setup_logging(snakemake.log[0])
pairs, stats = run(snakemake.params.model_dir, snakemake.input.prompts, settings=snakemake.params.settings)
write_parquet(pairs, snakemake.output.pairs)
write_json(stats, snakemake.output.stats)
log.info("rollouts: %s", stats)
