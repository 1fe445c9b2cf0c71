"""Write the finetune's report (Markdown) from its eval results and loss curve."""
from zhlm.eval.report import write_finetune_report
from zhlm.io import read_json, setup_logging

setup_logging(snakemake.log[0])
write_finetune_report(read_json(snakemake.input.results), snakemake.output.md, loss_plot=snakemake.input.plot)
