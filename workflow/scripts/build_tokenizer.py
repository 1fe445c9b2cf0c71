"""Build the byte-level BPE from the word counts and write the Hugging Face tokenizer files."""
from pathlib import Path

from zhlm.io import setup_logging, write_json
from zhlm.tokenizer.bpe import build_from_counts_file

log = setup_logging(snakemake.log[0])
p = snakemake.params
stats = build_from_counts_file(snakemake.input[0], Path(snakemake.output.tokenizer).parent,
                               vocab_size=p.vocab_size, min_frequency=p.min_frequency,
                               model_max_length=p.model_max_length)
write_json(stats, snakemake.output.stats)
log.info("tokenizer: %s", stats)
