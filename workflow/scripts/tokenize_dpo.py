"""Encode the preference pairs into chosen and rejected token files and meta.json."""
from zhlm.io import setup_logging
from zhlm.tokenizer.conversations import tokenize_dpo

log = setup_logging(snakemake.log[0])
meta = tokenize_dpo(snakemake.input.pairs, snakemake.input.eval_pairs, snakemake.input.tokenizer,
                    snakemake.params.out, batch_size=snakemake.params.batch_size)
log.info("dpo tokens: %s", {split: meta[split] for split in ("train", "eval")})
