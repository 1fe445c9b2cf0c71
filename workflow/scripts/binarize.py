"""Encode the pretraining splits into uint16/uint32 token files and meta.json (with each
source's token spans, which pretrain.phases' mixtures draw from)."""
from zhlm.io import setup_logging, write_json
from zhlm.tokenizer.binarize import binarize

log = setup_logging(snakemake.log[0])
meta = {split: binarize(snakemake.input[split], snakemake.input.tokenizer, snakemake.output[split],
                        batch_size=snakemake.params.batch_size)
        for split in ("train", "val")}
write_json(meta, snakemake.output.meta)
log.info("tokens: %s", {k: v["tokens"] for k, v in meta.items()})
spans = meta["train"].get("sources", {})
log.info("train tokens per source: %s", {source: sum(b - a for a, b in runs) for source, runs in spans.items()})
