"""Write the eval report (Markdown) and the run's headline numbers (summary.json) from the
stages' eval results, loss curves and, where the run has it, the retrieval eval."""
from pathlib import Path

from zhlm.eval.report import summary, write_report
from zhlm.io import read_json, setup_logging, write_json

setup_logging(snakemake.log[0])
results = {Path(p).stem: read_json(p) for p in snakemake.input.results}
retrieval = read_json(snakemake.input.retrieval[0]) if snakemake.input.retrieval else None
write_report(results, snakemake.output.md, loss_plots={Path(p).parent.name: p for p in snakemake.input.plots},
             retrieval=retrieval)
write_json(summary(results, retrieval), snakemake.output.summary)
