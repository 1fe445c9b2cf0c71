"""The Markdown report: every stage's results side by side."""
from __future__ import annotations

import os
import re
from pathlib import Path

from zhlm.io import atomic_path

# The headline metrics of each task, in the order they are shown.
TASK_METRICS = {
    "pinyin": ("exact_match",),
    "polarity": ("accuracy", "no_label"),
    "segmentation": ("precision", "recall", "f1"),
    "meaning": ("char_f1", "exact_match"),
    "origin": ("char_f1", "exact_match"),
    "example": ("char_f1", "exact_match"),
    "other": ("char_f1", "exact_match"),
}


_BREAKS = re.compile(r"\s*[\r\n]\s*")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _cell(text: str | None, limit: int = 300) -> str:
    """One line of text that cannot break a Markdown table or block."""
    # A run of line breaks shows as one ⏎: enough to see the shape of the answer.
    text = _BREAKS.sub(" ⏎ ", (text or "").strip()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "…"


def _bpc_section(results: dict) -> list[str]:
    rows = []
    for stage, r in results.items():
        if "bpc" in r:
            b = r["bpc"]
            rows.append([stage, b["bpc"], b["tokens"], b["chars"], b["tokens"] / b["chars"]])
    baseline = next((r["unigram_bpc"] for r in results.values() if "unigram_bpc" in r), None)
    if baseline is not None:
        rows.append(["unigram baseline (characters)", baseline, None, None, None])
    if not rows:
        return []
    return ["## Bits per character (held-out pretraining text)", "",
            "Lower is better; comparable across tokenizers. A character unigram model is the floor "
            "any trained model should beat.", "",
            *_table(["model", "bpc", "tokens", "characters", "tokens/char"], rows)]


def _task_section(results: dict) -> list[str]:
    stages = [s for s, r in results.items() if r.get("tasks")]
    if not stages:
        return []
    tasks = sorted({t for s in stages for t in results[s]["tasks"]},
                   key=lambda t: list(TASK_METRICS).index(t) if t in TASK_METRICS else len(TASK_METRICS))
    rows = []
    for task in tasks:
        n = {s: results[s]["tasks"].get(task, {}).get("n") for s in stages}
        for metric in TASK_METRICS.get(task, ("char_f1", "exact_match")):
            rows.append([task, metric, *[results[s]["tasks"].get(task, {}).get(metric) for s in stages],
                         "/".join(_fmt(n[s]) for s in stages)])
    return ["## Held-out tasks", "",
            "Greedy answers to held-out prompts. pinyin: exact match (tone marks kept); polarity: accuracy "
            "and share of answers with no label; segmentation: word precision/recall/F1 (micro); "
            "meaning, origin, example: character F1.", "",
            *_table(["task", "metric", *stages, "n"], rows)]


def _preference_section(results: dict) -> list[str]:
    rows = [[s, r["preference"].get("n"), r["preference"].get("accuracy"), r["preference"].get("mean_margin")]
            for s, r in results.items() if r.get("preference")]
    if not rows:
        return []
    return ["## Preference accuracy (held-out DPO pairs)", "",
            "Share of pairs where the model gives the reference answer a higher log-probability than "
            "the SFT model's own rollout; margin in nats.", "",
            *_table(["model", "n", "accuracy", "mean margin"], rows)]


def _choice_section(results: dict) -> list[str]:
    rows = []
    for stage, r in results.items():
        for name, c in (r.get("choice") or {}).items():
            rows.append([name, stage, c.get("n"), c.get("letter_accuracy"), c.get("cloze_accuracy"),
                         c.get("chance")])
    if not rows:
        return []
    rows.sort(key=lambda row: row[0])
    return ["## Multiple choice", "",
            "letter: log-prob of the option letter after the question with its options; "
            "cloze: mean per-token log-prob of each option's text as the answer to the bare question.", "",
            *_table(["set", "model", "n", "letter acc.", "cloze acc.", "chance"], rows)]


def _samples_section(results: dict) -> list[str]:
    stages = [s for s, r in results.items() if r.get("samples")]
    if not stages:
        return []
    lines = ["## Sample answers", ""]
    prompts: dict[str, dict] = {}
    for stage in stages:
        for sample in results[stage]["samples"]:
            entry = prompts.setdefault(sample["prompt"], {"task": sample.get("task"),
                                                          "reference": sample.get("reference"), "answers": {}})
            entry["answers"][stage] = sample.get("answer")
    for prompt, entry in prompts.items():
        title = f" ({entry['task']})" if entry["task"] else ""
        lines += [f"**Prompt{title}:** {_cell(prompt)}", ""]
        if entry["reference"] is not None:
            lines.append(f"- reference: {_cell(entry['reference'])}")
        for stage in stages:
            answer = entry["answers"].get(stage, "")
            shown = "(prompt too long for the context)" if answer is None else _cell(answer) or "(empty)"
            lines.append(f"- {stage}: {shown}")
        lines.append("")
    return lines


def write_report(results: dict[str, dict], out_md: str | os.PathLike, *,
                 loss_plots: dict[str, str | os.PathLike] | None = None, title: str = "zhlm eval report") -> None:
    """Write the report (atomically); images are linked relative to the report's folder."""
    out_md = Path(out_md)
    lines = [f"# {title}", "", "Stages: " + ", ".join(results) + ".", ""]
    for section in (_bpc_section, _task_section, _preference_section, _choice_section, _samples_section):
        lines += section(results)
    if loss_plots:
        lines += ["## Loss curves", ""]
        for stage, path in loss_plots.items():
            link = Path(os.path.relpath(Path(path).resolve(), out_md.parent.resolve())).as_posix()
            lines += [f"### {stage}", "", f"![{stage} loss]({link})", ""]
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
