"""A LoRA adapter merged into the model it was trained on: the stage's ordinary model folder."""
from zhlm.io import setup_logging
from zhlm.train.lora import merge_folder

log = setup_logging(snakemake.log[0])
params = snakemake.params
merge_folder(params.base, params.adapter, params.tokenizer, params.out)
log.info("merged the adapter in %s into %s, written to %s", params.adapter, params.base, params.out)
