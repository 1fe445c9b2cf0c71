"""Write the eval report (Markdown) from the stages' eval results and loss curves."""
from pathlib import Path

from zhlm.eval.report import write_report
from zhlm.io import read_json, setup_logging

setup_logging(snakemake.log[0])
write_report({Path(p).stem: read_json(p) for p in snakemake.input.results}, snakemake.output[0],
             loss_plots={Path(p).parent.name: p for p in snakemake.input.plots})
