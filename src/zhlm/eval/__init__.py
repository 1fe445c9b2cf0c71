"""Evaluation: bits per character, held-out task metrics, preference accuracy, multiple choice, report."""
from zhlm.eval.bpc import evaluate_bpc, unigram_bpc
from zhlm.eval.choice import choice_accuracy, read_choice_csv
from zhlm.eval.metrics import char_f1, exact_match, normalize_answer, polarity_label, segmentation_f1
from zhlm.eval.preference import preference_accuracy
from zhlm.eval.report import write_report
from zhlm.eval.run import evaluate_model
from zhlm.eval.tasks import evaluate_tasks, task_of

__all__ = [
    "evaluate_bpc", "unigram_bpc", "choice_accuracy", "read_choice_csv", "char_f1", "exact_match",
    "normalize_answer", "polarity_label", "segmentation_f1", "preference_accuracy", "write_report",
    "evaluate_model", "evaluate_tasks", "task_of",
]
