"""Encode the SFT splits into token files (ids, loss mask, offsets) and meta.json."""
from zhlm.io import setup_logging
from zhlm.tokenizer.conversations import tokenize_sft

log = setup_logging(snakemake.log[0])
meta = tokenize_sft(snakemake.input.train, snakemake.input.eval, snakemake.input.tokenizer,
                    snakemake.params.out, batch_size=snakemake.params.batch_size)
log.info("sft tokens: %s", {split: meta[split] for split in ("train", "eval")})
