"""Score one stage's model on held-out data."""
from pathlib import Path

from zhlm.eval.run import evaluate_files
from zhlm.io import setup_logging, write_json

log = setup_logging(snakemake.log[0])
p, inputs = snakemake.params, snakemake.input
result = evaluate_files(
    p.model_dir, stage=snakemake.wildcards.stage, val_files=inputs.val, train_files=inputs.train,
    task_files=inputs.get("tasks", []), pair_files=inputs.get("pairs", []),
    choice_files={Path(path).stem: (path, p.choice_heldout_only[Path(path).stem])
                     for path in inputs.get("choice", [])},
    holdout=p.holdout, seq_len=p.seq_len, settings=p.settings, reference_dir=p.reference_dir,
    dpo_settings=p.dpo_settings)
write_json(result, snakemake.output[0])
log.info("%s: bpc %.3f", snakemake.wildcards.stage, result["bpc"]["bpc"])
