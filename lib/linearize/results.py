"""The results schema: one JSON record per page, written by the code that writes the page.

``docs/results.json`` (the study, :mod:`linearize.study`) and ``docs/recipe.json`` (the recipe
page) share this schema::

    {"teacher": {"name": str, "ppl": float, "tasks": {TASK: {"acc": 0..1, "stderr": float, "docs": int}}},
     "runs": [{"arch": str, "variant": str, "hybrid": bool, "tokens": int, "wall_s": float,
               "ppl": float, "kl": float, "tasks": {TASK: {"acc", "stderr", "docs"}}}]}

TASK is one of :data:`TASKS`. A value that was not measured is ``null`` (JSON has no NaN), and
a task that was not evaluated is absent from ``tasks``. Records may carry more keys (a run's
folder, an ``analysis`` block); readers ignore what they do not know. ``tokens`` and ``wall_s``
are the training tokens and wall seconds summed over the run's stages; ``ppl`` and ``kl`` the
validation perplexity and per-token KL(teacher || student) after the last stage. The study's
records also say ``evaluated`` (false: a cell still in progress, no tasks yet) and ``ppl_after``
(the stage whose validation ``ppl``/``kl`` are: "stage3" for a finished run; "conversion" for
a run whose training has only begun).

API: :func:`task_record`, :func:`tasks_from_eval` (an ``evaluate_tasks`` result -> ``tasks``),
:func:`teacher_record`, :func:`run_record`, :func:`results_record` (validated dict),
:func:`write_results` (markdown page + JSON twin), :func:`read_results`, and for pages that lay
out their own tables :func:`average` and :func:`cell`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .tasks import PAPER_TASKS

TASKS = PAPER_TASKS
# Column labels in the paper's order (as linearize.evaluate.COLUMNS; repeated here so this
# module imports nothing heavy).
LABELS = {"lambada_openai": "Lamb.", "winogrande": "WinoG.", "arc_easy": "Arc-E", "arc_challenge": "Arc-C",
          "piqa": "PIQA", "hellaswag": "HellaS."}
MISSING = "-"


class SchemaError(ValueError):
    """A record that does not follow the results schema (names the field and the fix)."""


def _num(value) -> float | None:
    """A float for JSON, None for a missing or non-finite value."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def task_record(acc: float, stderr: float, docs: int) -> dict:
    return {"acc": float(acc), "stderr": float(stderr), "docs": int(docs)}


def tasks_from_eval(results: Mapping | None, metric: str = "acc") -> dict:
    """``{TASK: task_record}`` from an ``evaluate.evaluate_tasks`` result (None: no tasks).
    ``docs`` is the number of documents scored (lm-eval's effective count)."""
    if results is None:
        return {}
    out = {}
    for task, m in results["tasks"].items():
        if task not in TASKS:
            continue
        name = metric if metric in m else "acc"
        acc = m[name]
        docs = m.get("n_docs") or (len(m["per_doc"]["doc_id"]) if m.get("per_doc") else results.get("limit"))
        stderr = m.get(f"{name}_stderr")
        if stderr is None and docs is not None and docs > 1:
            # lm-eval leaves it out when run without bootstrap (bootstrap_iters=0); for a 0/1
            # score its own formula, sample stddev / sqrt(n), is sqrt(acc (1 - acc) / (n - 1))
            stderr = math.sqrt(acc * (1 - acc) / (docs - 1))
        if stderr is None or docs is None:
            raise SchemaError(f"the {task} result of {results.get('model', '?')} has no stderr or document "
                              "count: evaluate it again with linearize.evaluate.evaluate_tasks")
        out[task] = task_record(acc, stderr, docs)
    return out


def teacher_record(name: str, ppl: float | None, tasks: Mapping) -> dict:
    return {"name": str(name), "ppl": _num(ppl), "tasks": dict(tasks)}


def run_record(arch: str, variant: str, hybrid: bool, tokens: int | None, wall_s: float | None,
               ppl: float | None, kl: float | None, tasks: Mapping, **extra) -> dict:
    """One run. ``extra`` keys (e.g. ``run="gla/cpu-study-kd"``, ``preset``) are kept as given."""
    record = {"arch": str(arch), "variant": str(variant), "hybrid": bool(hybrid),
              "tokens": None if tokens is None else int(tokens), "wall_s": _num(wall_s),
              "ppl": _num(ppl), "kl": _num(kl), "tasks": dict(tasks)}
    record.update(extra)
    return record


def _check_tasks(where: str, tasks) -> None:
    if not isinstance(tasks, Mapping):
        raise SchemaError(f"{where}.tasks must be an object {{TASK: {{acc, stderr, docs}}}}, got {type(tasks).__name__}")
    for task, rec in tasks.items():
        if task not in TASKS:
            raise SchemaError(f"{where}.tasks has unknown task {task!r}; tasks are {list(TASKS)}")
        missing = {"acc", "stderr", "docs"} - set(rec)
        if missing:
            raise SchemaError(f"{where}.tasks.{task} lacks {sorted(missing)}")
        if not 0.0 <= rec["acc"] <= 1.0:
            raise SchemaError(f"{where}.tasks.{task}.acc = {rec['acc']} is not a fraction in [0, 1] (percent given?)")
        if not rec["stderr"] >= 0.0:
            raise SchemaError(f"{where}.tasks.{task}.stderr = {rec['stderr']} must be >= 0")
        if not isinstance(rec["docs"], int) or rec["docs"] < 1:
            raise SchemaError(f"{where}.tasks.{task}.docs = {rec['docs']!r} must be a positive int")


def validate(record: Mapping) -> dict:
    """``record`` unchanged when it follows the schema, else a SchemaError naming the field."""
    if not isinstance(record, Mapping) or "teacher" not in record or "runs" not in record:
        raise SchemaError("a results record is an object with 'teacher' and 'runs'")
    teacher = record["teacher"]
    for key in ("name", "ppl", "tasks"):
        if key not in teacher:
            raise SchemaError(f"teacher lacks {key!r}")
    _check_tasks("teacher", teacher["tasks"])
    for i, run in enumerate(record["runs"]):
        missing = [k for k in ("arch", "variant", "hybrid", "tokens", "wall_s", "ppl", "kl", "tasks") if k not in run]
        if missing:
            raise SchemaError(f"runs[{i}] lacks {missing}")
        if not isinstance(run["hybrid"], bool):
            raise SchemaError(f"runs[{i}].hybrid must be true or false, got {run['hybrid']!r}")
        _check_tasks(f"runs[{i}]", run["tasks"])
    return dict(record)


def results_record(teacher: Mapping, runs: Iterable[Mapping], **extra) -> dict:
    """The validated record ``{"teacher", "runs", **extra}``."""
    return validate({"teacher": dict(teacher), "runs": [dict(r) for r in runs], **extra})


def write_json(path: str | os.PathLike, record: Mapping) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(validate(record), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def read_results(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SchemaError(f"cannot read results {path}: {err}") from err
    return validate(record)


# ---------------------------------------------------------------------------------------
# Page helpers
# ---------------------------------------------------------------------------------------
def average(tasks: Mapping, names: Iterable[str] = TASKS) -> tuple[float, float]:
    """(mean accuracy, its stderr) over ``names``; NaN unless all are present. The tasks'
    documents are disjoint, so their errors are independent: stderr = sqrt(sum se^2) / n."""
    names = list(names)
    if not all(t in tasks for t in names):
        return math.nan, math.nan
    acc = sum(tasks[t]["acc"] for t in names) / len(names)
    se = math.sqrt(sum(tasks[t]["stderr"] ** 2 for t in names)) / len(names)
    return acc, se


def cell(acc: float | None, stderr: float | None = None, decimals: int = 1) -> str:
    """A fraction as 'percent ± stderr' (percent points), '-' when missing."""
    if acc is None or (isinstance(acc, float) and math.isnan(acc)):
        return MISSING
    if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)):
        return f"{100 * acc:.{decimals}f}"
    return f"{100 * acc:.{decimals}f} ± {100 * stderr:.{decimals}f}"


def _fmt(value, spec: str) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_rows(record: Mapping, label=None) -> str:
    """The record as one markdown table: the teacher, then every run; each task and the
    average as 'percent ± stderr', then the above-chance margin, documents, ppl, KL, tokens and
    wall time. ``label(run) -> str`` names a run's row (default 'arch variant')."""
    from .compare import CompareError, above_chance_margin

    label = label or (lambda r: f"{r['arch']} {r['variant']}" + (" (hybrid)" if r.get("hybrid") else ""))
    teacher_avg, _ = average(record["teacher"]["tasks"])
    head = ["model", *LABELS.values(), "Avg.", "margin", "docs/task", "ppl", "KL", "tokens", "wall h"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]

    def row(name, rec, is_teacher):
        tasks = rec["tasks"]
        avg, se = average(tasks)
        try:
            margin = above_chance_margin(avg, teacher_avg) if not (math.isnan(avg) or math.isnan(teacher_avg)) else None
        except CompareError:
            margin = None
        docs = sorted({t["docs"] for t in tasks.values()})
        cells = [name, *(cell(tasks[t]["acc"], tasks[t]["stderr"]) if t in tasks else MISSING for t in TASKS),
                 cell(avg, se), "1" if is_teacher and margin is not None else _fmt(margin, ".2f"),
                 "/".join(map(str, docs)) or MISSING, _fmt(rec.get("ppl"), ".1f"),
                 MISSING if is_teacher else _fmt(rec.get("kl"), ".2f"),
                 MISSING if is_teacher else _fmt(rec.get("tokens"), ","),
                 MISSING if is_teacher or rec.get("wall_s") is None else f"{rec['wall_s'] / 3600:.2f}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")

    row(f"teacher ({record['teacher']['name']})", record["teacher"], True)
    for run in record["runs"]:
        row(label(run), run, False)
    return "\n".join(lines)


def write_results(path_md: str | os.PathLike, path_json: str | os.PathLike, teacher: Mapping,
                  runs: Iterable[Mapping], title: str = "Results", intro: str = "",
                  sections: Iterable[str] = (), **extra) -> dict:
    """Validate ``teacher`` and ``runs`` (from :func:`teacher_record` / :func:`run_record`),
    write the JSON record to ``path_json`` and a markdown page to ``path_md``: ``title``,
    ``intro``, the table of :func:`markdown_rows`, then ``sections`` (markdown strings) as
    given. ``extra`` keys go into the JSON record. Returns the record."""
    record = results_record(teacher, runs, **extra)
    write_json(path_json, record)
    path_md = Path(path_md)
    path_md.parent.mkdir(parents=True, exist_ok=True)
    body = [f"# {title}", ""]
    if intro:
        body += [intro.strip(), ""]
    body += [f"Machine-readable twin: `{Path(path_json).name}` (schema: `linearize.results`). Accuracy in percent "
             "± its standard error; Avg. over the six tasks (errors combined as independent); margin = "
             "(Avg. - chance Avg.) / (teacher Avg. - chance Avg.), chance 0 for LAMBADA, 1/2 for WinoGrande "
             "and PIQA, 1/4 for ARC and HellaSwag.", "", markdown_rows(record), ""]
    for section in sections:
        body += [section.strip(), ""]
    path_md.write_text("\n".join(body))
    return record
