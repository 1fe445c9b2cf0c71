"""Score the model folder the finetune started from and the fine-tuned one, and jieba's baseline."""
from pathlib import Path

from zhlm.eval.finetune import evaluate_finetune_files
from zhlm.io import setup_logging, write_json

log = setup_logging(snakemake.log[0])
p, inputs = snakemake.params, snakemake.input
result = evaluate_finetune_files(
    p.init_dir, p.model_dir, finetune_task_files=inputs.finetune_tasks, task_files=inputs.tasks,
    val_files=inputs.val, choice_files={Path(path).stem: (path, p.choice_heldout_only[Path(path).stem])
                                        for path in inputs.choice},
    holdout=p.holdout, seq_len=p.seq_len, settings=p.settings)
write_json(result, snakemake.output[0])
for task in result["finetune_tasks"]:
    log.info("%s: before %s, after %s", task, result["before"]["tasks"].get(task), result["after"]["tasks"].get(task))
