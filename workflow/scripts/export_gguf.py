"""The DPO model folder as a GGUF file, and an ollama Modelfile beside it."""
from zhlm.export import export_for_ollama
from zhlm.io import setup_logging

log = setup_logging(snakemake.log[0])
out = snakemake.output
summary = export_for_ollama(snakemake.params.model_dir, out.gguf, snakemake.params.dtype)
log.info("wrote %s: %d bytes, %s, tensors by type %s", out.gguf, summary["bytes"], summary["dtype"], summary["tensors"])
