"""Evaluation: bits per character, held-out task metrics, looping answers, preference and DPO
implicit-reward accuracy, multiple choice, report and summary."""
from zhlm.eval.bpc import evaluate_bpc, unigram_bpc
from zhlm.eval.choice import choice_accuracy, read_choice_csv
from zhlm.eval.metrics import (
    char_f1,
    exact_match,
    loop_unit,
    looping_share,
    normalize_answer,
    paired_difference,
    polarity_label,
    segmentation_f1,
)
from zhlm.eval.preference import implicit_reward_accuracy, preference_accuracy
from zhlm.eval.report import summary, write_report
from zhlm.eval.run import evaluate_model
from zhlm.eval.tasks import evaluate_tasks, task_of

__all__ = [
    "evaluate_bpc", "unigram_bpc", "choice_accuracy", "read_choice_csv", "char_f1", "exact_match", "loop_unit",
    "looping_share", "normalize_answer", "paired_difference", "polarity_label", "segmentation_f1",
    "implicit_reward_accuracy", "preference_accuracy", "summary", "write_report", "evaluate_model", "evaluate_tasks",
    "task_of",
]
