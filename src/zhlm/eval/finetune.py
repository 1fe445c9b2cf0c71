"""The finetune's eval: the model folder it started from and the fine-tuned one, side by side, on
the finetune's held-out rows (what it bought) and on every other eval (what it cost), beside
jieba's part-of-speech tagger on the held-out entity rows (the baseline that needs no training).
"""
from __future__ import annotations

from zhlm.eval.run import EvalConfig, choice_sets_of, evaluate_model, read_rows
from zhlm.eval.tasks import jieba_baseline, select_rows
from zhlm.tokenizer.word_counts import iter_parquet_texts


def evaluate_finetune(init_dir, model_dir, *, finetune_rows: list[dict], task_rows: list[dict],
                      val_files=(), choice_sets: dict[str, list[dict]] | None = None, seq_len: int,
                      settings: dict | None = None) -> dict:
    """Both models through zhlm.eval.run.evaluate_model (`before`: init_dir, `after`: model_dir) on
    the same held-out rows, the finetune's and the other tasks' together; and where the finetune's
    rows hold entity tasks, jieba's scores on the same entity rows (`baseline`).

    finetune_rows, task_rows: held-out sft rows of the finetune's sources and of the sft stage's.
    """
    limit = EvalConfig(**(settings or {})).max_task_items
    result = {"init": str(init_dir), "model": str(model_dir),
              "finetune_tasks": sorted(select_rows(finetune_rows)), "baseline": {}}
    for name, folder in (("before", init_dir), ("after", model_dir)):
        result[name] = evaluate_model(
            folder, stage="init" if name == "before" else "finetune",
            val_texts=iter_parquet_texts(val_files, ["text"]), task_rows=task_rows + finetune_rows,
            choice_sets=choice_sets, seq_len=seq_len, settings=settings)
    entities = jieba_baseline(finetune_rows, limit)
    if entities["n"]:
        result["baseline"]["entities"] = {"name": "jieba.posseg (nr*, ns, nt)", **entities}
    return result


def evaluate_finetune_files(init_dir, model_dir, *, finetune_task_files, task_files=(), val_files=(),
                            choice_files: dict | None = None, holdout: float = 0.0, seq_len: int,
                            settings: dict | None = None) -> dict:
    """evaluate_finetune on the workflow's files (each a list of a split's parquet shards);
    choice_files as zhlm.eval.run.choice_sets_of takes them."""
    return evaluate_finetune(init_dir, model_dir, finetune_rows=read_rows(finetune_task_files) or [],
                             task_rows=read_rows(task_files) or [], val_files=val_files,
                             choice_sets=choice_sets_of(choice_files, holdout), seq_len=seq_len, settings=settings)
