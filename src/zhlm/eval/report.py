"""The Markdown report: every stage's results side by side, each beside the stage before it;
and the run's headline numbers as one flat dict (summary.json), which runs compare by."""
from __future__ import annotations

import collections
import os
import re
from pathlib import Path

from zhlm.eval.metrics import LOOP_MAX_PERIOD, LOOP_MIN_CHARS, LOOP_MIN_REPEATS, loop_unit, paired_difference
from zhlm.io import atomic_path

# The headline metrics of each task, in the order they are shown.
TASK_METRICS = {
    "pinyin": ("exact_match",),
    "polarity": ("accuracy", "no_label"),
    "segmentation": ("precision", "recall", "f1"),
    "entities": ("precision", "recall", "f1", "unparsed"),
    "meaning": ("char_f1", "exact_match"),
    "origin": ("char_f1", "exact_match"),
    "example": ("char_f1", "exact_match"),
    "other": ("char_f1", "exact_match"),
}
FREE_TEXT_METRICS = TASK_METRICS["other"]  # a task not listed is scored as free text


def _by_task_order(tasks) -> list[str]:
    """Tasks in TASK_METRICS' order, any other after them."""
    order = list(TASK_METRICS)
    return sorted(tasks, key=lambda t: order.index(t) if t in order else len(order))


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


def _delta(before, after) -> str | None:
    """after − before, signed; None when either is missing."""
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return None
    return f"{round(after - before, 3) or 0.0:+.3f}"  # no "-0.000" for a difference that rounds away


def delta_table(columns: dict[str, dict[str, float]], label: str = "metric") -> list[str]:
    """A table of metrics (rows, in order of first appearance) by column, each column after the
    first followed by Δ: its value minus the previous column's (– where either is missing)."""
    names = list(columns)
    metrics = list(dict.fromkeys(m for values in columns.values() for m in values))
    header = [label, names[0]] + [h for name in names[1:] for h in (name, "Δ")]
    rows = []
    for metric in metrics:
        values = [columns[name].get(metric) for name in names]
        rows.append([metric, values[0], *[v for before, after in zip(values, values[1:])
                                          for v in (after, _delta(before, after))]])
    return _table(header, rows)


def summary(results: dict[str, dict], retrieval: dict | None = None) -> dict[str, float]:
    """The headline numbers of a run, flat: {"stage.metric": value}, stages in the results' order,
    then, where the run has a retrieval eval, its recall and its answers' character F1 without and
    with retrieval (`retrieval.recall@1`, `retrieval.char_f1.with`, ...).

    Per stage, where it has them: bpc; each task's metrics (TASK_METRICS) and its looping share
    (`task.metric`); the looping share of all generated answers (`looping`) and of the sample
    answers (`samples.looping`); preference and implicit-reward accuracy and mean margin; and
    each choice set's letter and cloze accuracy (`choice.set.letter_accuracy`).
    """
    out: dict[str, float] = {}
    for stage, r in results.items():
        values: dict[str, float | None] = {}
        if "bpc" in r:
            values["bpc"] = r["bpc"]["bpc"]
        tasks = r.get("tasks") or {}
        for task in _by_task_order(tasks):
            for metric in (*TASK_METRICS.get(task, FREE_TEXT_METRICS), "looping"):
                values[f"{task}.{metric}"] = tasks[task].get(metric)
        if r.get("looping"):
            values["looping"] = r["looping"]["all"]["share"]
            values["samples.looping"] = r["looping"]["samples"]["share"]
        for name in ("preference", "implicit_reward"):
            for metric in ("accuracy", "mean_margin"):
                values[f"{name}.{metric}"] = (r.get(name) or {}).get(metric)
        for name, c in (r.get("choice") or {}).items():
            for metric in ("letter_accuracy", "cloze_accuracy"):
                values[f"choice.{name}.{metric}"] = c.get(metric)
        out |= {f"{stage}.{key}": value for key, value in values.items() if value is not None}
    if retrieval:
        out |= {f"retrieval.{k}": retrieval[k] for k in ("recall@1", "recall@5") if k in retrieval}
        f1 = retrieval.get("char_f1", {})
        out |= {f"retrieval.char_f1.{k}": f1[k] for k in ("without", "with") if k in f1}
    return out


def by_stage(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """A summary's numbers by stage: {"sft.bpc": x} -> {"sft": {"bpc": x}} (stage names hold no dot)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        stage, _, metric = key.partition(".")
        out.setdefault(stage, {})[metric] = value
    return out


def _cell(text: str | None, limit: int = 300) -> str:
    """One line of text that cannot break a Markdown table or block."""
    # A run of line breaks shows as one ⏎: enough to see the shape of the answer.
    text = _BREAKS.sub(" ⏎ ", (text or "").strip()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + "…"


def _stages_section(results: dict) -> list[str]:
    columns = by_stage(summary(results))
    if not columns:
        return []
    return ["## Stage by stage", "",
            "What each stage bought: the headline numbers of every stage (as in summary.json), each "
            "stage beside the one before it; Δ is this stage minus the previous one. Lower is better for "
            "bpc and looping, higher for the rest.", "",
            *delta_table(columns)]


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
    tasks = _by_task_order({t for s in stages for t in results[s]["tasks"]})
    rows = []
    for task in tasks:
        n = {s: results[s]["tasks"].get(task, {}).get("n") for s in stages}
        for metric in TASK_METRICS.get(task, FREE_TEXT_METRICS):
            rows.append([task, metric, *[results[s]["tasks"].get(task, {}).get(metric) for s in stages],
                         "/".join(_fmt(n[s]) for s in stages)])
    return ["## Held-out tasks", "",
            "Greedy answers to held-out prompts. pinyin: exact match (tone marks kept); polarity: accuracy "
            "and share of answers with no label; segmentation: word precision/recall/F1 (micro); "
            "entities: entity precision/recall/F1 (micro over people, places and organisations) and the share "
            "of answers not in the answer format; meaning, origin, example: character F1.", "",
            *_table(["task", "metric", *stages, "n"], rows)]


def _looping_section(results: dict) -> list[str]:
    columns, counts = {}, []
    for stage, r in results.items():
        if r.get("looping"):
            groups, tasks = r["looping"], r.get("tasks") or {}
            columns[stage] = {"all answers": groups["all"]["share"], "task answers": groups["tasks"]["share"],
                              "sample answers": groups["samples"]["share"],
                              **{task: tasks[task].get("looping") for task in _by_task_order(tasks)}}
            counts.append(f"{stage} {groups['all']['n']} ({groups['tasks']['n']} task, "
                          f"{groups['samples']['n']} sample)")
    if not columns:
        return []
    return ["## Looping answers", "",
            "Share of the generated answers (held-out task answers and sample answers) that fall into a "
            f"loop: ignoring whitespace, a unit of 1 to {LOOP_MAX_PERIOD} characters repeated back-to-back "
            f"at least {LOOP_MIN_REPEATS} times over at least {LOOP_MIN_CHARS} characters (你你你你你…, "
            "有此有此有此…; 谢谢谢谢 is not a loop). Lower is better; Δ is this stage minus the previous one. "
            "Answers: " + "; ".join(counts) + " (a task's count is its n under Held-out tasks).", "",
            *delta_table(columns, "answers")]


def paired_changes(before: list[dict], after: list[dict]) -> list[dict]:
    """Task answers of two models on the same held-out items (evaluate_tasks' answers, matched by
    id): per task, the mean change of the per-item score and of looping, its paired standard
    error, and whether it is beyond noise (more than 2 SE)."""
    old = {a["id"]: a for a in before}
    pairs = collections.defaultdict(list)
    for a in after:
        if a["id"] in old and a["task"] == old[a["id"]]["task"]:
            pairs[a["task"]].append((old[a["id"]], a))
    rows = []
    for task in _by_task_order(pairs):
        items = pairs[task]
        for measure, value in (("score", lambda a: a["score"]),
                               ("looping", lambda a: float(loop_unit(a["answer"]) is not None))):
            mean, se = paired_difference([value(b) for b, _ in items], [value(a) for _, a in items])
            rows.append({"task": task, "measure": measure, "n": len(items), "mean_change": mean, "se": se,
                         "beyond_noise": abs(mean) > 2 * se})
    return rows


def _noise_section(results: dict) -> list[str]:
    """Each stage's task answers against the previous stage's on the same held-out items."""
    stages = [s for s, r in results.items() if r.get("task_answers")]
    rows = [[f"{before} → {after}", c["task"], c["measure"], c["n"], _delta(0.0, c["mean_change"]), c["se"],
             "beyond noise" if c["beyond_noise"] else "within noise"]
            for before, after in zip(stages, stages[1:])
            for c in paired_changes(results[before]["task_answers"], results[after]["task_answers"])]
    if not rows:
        return []
    return ["## Changes beyond noise?", "",
            "Each stage against the previous one on the same held-out items: the mean change of the per-item "
            "score (right or wrong for pinyin and polarity, the sentence's word F1 for segmentation, the "
            "entity F1 for entities, character F1 for the free-text tasks) and of the share of looping "
            "answers, with the paired standard error (SE) of that mean. A change larger than 2 SE is beyond "
            "the noise of this many items.", "",
            *_table(["stages", "task", "per item", "n", "mean Δ", "SE", "verdict"], rows)]


def _preference_section(results: dict) -> list[str]:
    rows = [[s, r["preference"].get("n"), r["preference"].get("accuracy"), r["preference"].get("mean_margin")]
            for s, r in results.items() if r.get("preference")]
    if not rows:
        return []
    lines = ["## Preference accuracy (held-out DPO pairs)", "",
             "Share of pairs where the model gives the reference answer a higher log-probability than "
             "the SFT model's own rollout; margin in nats. Pairs are encoded and cut as DPO reads them.", "",
             *_table(["model", "n", "accuracy", "mean margin"], rows)]
    rewards = [[s, r["implicit_reward"].get("n"), r["implicit_reward"].get("beta"),
                r["implicit_reward"].get("accuracy"), r["implicit_reward"].get("mean_margin")]
               for s, r in results.items() if r.get("implicit_reward")]
    if rewards:
        lines += ["DPO implicit-reward accuracy: the share of the same pairs where "
                  "β·[(log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))] > 0, "
                  "the reference π_ref being the SFT model, exactly as DPO's loss scores them; the mean "
                  "of that margin. A tie is not a win (the SFT model against itself scores 0).", "",
                  *_table(["model", "n", "β", "implicit-reward acc.", "mean reward margin"], rewards)]
    return lines


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


def _retrieval_section(r: dict | None) -> list[str]:
    """zhlm.eval.retrieval's results, where the run has them."""
    if not r:
        return []
    f1 = r["char_f1"]
    rows = [["recall@1", r.get("recall@1")], ["recall@5", r.get("recall@5")],
            ["right document in the prompt", r.get("right_in_prompt")],
            ["reference answer in the prompt", r.get("answer_in_prompt")],
            ["passages in the prompt (mean)", r.get("passages_in_prompt")],
            ["char F1 without retrieval", f1.get("without")], ["char F1 with retrieval", f1.get("with")],
            ["Δ char F1", _delta(f1.get("without"), f1.get("with"))],
            ["char F1 with retrieval, right document in the prompt", f1.get("with_right_in_prompt")],
            ["char F1 of the best passage itself as the answer (no model)", f1.get("best_passage")]]
    lines = ["## Retrieval", "",
             f"The final model ({r.get('model', 'dpo')}) answers {r['n']} held-out '{r['task']}' questions greedily, "
             f"without and with the best of the documents' passages ({r.get('source', 'documents')}: "
             f"{r['documents']} documents, {r['passages']} passages; BM25 over jieba words) in its system "
             f"message: up to {r['top_k']}, as many as leave the answer its room, as `zhlm chat --docs` puts "
             "them. A question ITEM#task's right document is the one with id ITEM; recall@k is the share of "
             "questions whose right document is among the k best passages. Character F1 as under Held-out tasks.",
             "", *_table(["metric", "value"], rows)]
    for s in r.get("samples", []):
        lines += [f"**Prompt:** {_cell(s['prompt'])} (passages: {', '.join(s['passages']) or 'none'})", "",
                  f"- reference: {_cell(s['reference'])}", f"- without: {_cell(s['without'])}",
                  f"- with: {_cell(s['with'])}", ""]
    return lines


def _entities_section(result: dict) -> list[str]:
    """zhlm.eval.finetune's entity scores: jieba's baseline, the model before and after."""
    columns = {"jieba (no training)": result["baseline"].get("entities")}
    columns |= {f"{name} ({result[key]['model_dir']})": result[key].get("tasks", {}).get("entities")
                for name, key in (("before", "before"), ("after", "after"))}
    rows = [[name, s["n"], s["precision"], s["recall"], s["f1"],
             *[s["by_type"][kind]["f1"] for kind in ("person", "place", "organization")], s.get("unparsed")]
            for name, s in columns.items() if s and s.get("n")]
    if not rows:
        return []
    lines = ["## Entity extraction (held-out sentences)", "",
             "People (nr), places (ns) and organisations (nt) of held-out People's Daily sentences, each "
             "sentence's (type, name) pairs against the tagged corpus's, pooled over sentences (micro). The "
             "corpus tags a name as surname and given name, joined here into one person; it has no "
             "multi-word organisations (中国共产党 is the place 中国 and a noun), which jieba's tagger "
             "reports as one, so jieba's organisations and places score low against this gold. unparsed: "
             "answers with no line in the answer format (they predict nothing).", "",
             *_table(["model", "n", "precision", "recall", "F1", "person F1", "place F1", "organisation F1",
                      "unparsed"], rows)]
    answers = {key: {a["id"]: a for a in result[key].get("task_answers", []) if a["task"] == "entities"}
               for key in ("before", "after")}
    for item in list(answers["after"].values())[:3]:
        lines += [f"**Prompt:** {_cell(item['prompt'].split(chr(10), 1)[-1])}", "",
                  f"- reference: {_cell(item['reference'])}",
                  f"- before: {_cell((answers['before'].get(item['id']) or {}).get('answer'))}",
                  f"- after: {_cell(item['answer'])}", ""]
    return lines


def _result_sections(results: dict[str, dict]) -> list[str]:
    """The sections of evaluate_model's results, one column per stage."""
    lines = []
    for section in (_stages_section, _bpc_section, _task_section, _noise_section, _looping_section,
                    _preference_section, _choice_section, _samples_section):
        lines += section(results)
    return lines


def _loss_section(loss_plots: dict[str, str | os.PathLike] | None, out_md: Path) -> list[str]:
    if not loss_plots:
        return []
    lines = ["## Loss curves", ""]
    for stage, path in loss_plots.items():
        link = Path(os.path.relpath(Path(path).resolve(), out_md.parent.resolve())).as_posix()
        lines += [f"### {stage}", "", f"![{stage} loss]({link})", ""]
    return lines


def write_report(results: dict[str, dict], out_md: str | os.PathLike, *,
                 loss_plots: dict[str, str | os.PathLike] | None = None, retrieval: dict | None = None,
                 title: str = "zhlm eval report") -> None:
    """Write the report (atomically); images are linked relative to the report's folder. `retrieval`:
    zhlm.eval.retrieval's results, shown as a section when given."""
    out_md = Path(out_md)
    lines = [f"# {title}", "", "Stages: " + ", ".join(results) + ".", ""]
    lines += _result_sections(results) + _retrieval_section(retrieval) + _loss_section(loss_plots, out_md)
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")


def write_finetune_report(result: dict, out_md: str | os.PathLike, *, loss_plot: str | os.PathLike | None = None,
                          title: str = "zhlm fine-tune report") -> None:
    """Write the report of zhlm.eval.finetune's results (atomically): the finetune's own tasks, then
    every eval of the model before (init) and after (finetune), each after beside its before."""
    out_md = Path(out_md)
    lines = [f"# {title}", "",
             f"{result['model']} is {result['init']} fine-tuned on {', '.join(result['finetune_tasks'])}. "
             "Below, init is the model before and finetune the model after, scored on the same held-out "
             "items: the finetune's own tasks show what it bought, the others what it cost.", ""]
    lines += _entities_section(result)
    lines += _result_sections({"init": result["before"], "finetune": result["after"]})
    lines += _loss_section({"finetune": loss_plot} if loss_plot else None, out_md)
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
