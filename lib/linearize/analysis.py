"""The study's results record and its paired analyses, for the results page of
:mod:`linearize.study`.

* :func:`study_record` turns the runs found under ``outputs/`` into the schema of
  :mod:`linearize.results` (teacher record + one record per run);
* :func:`with_stderr` puts each accuracy cell of a paper-format table beside its stderr;
* :func:`analysis` computes what separates students: each run's above-chance margin with a
  bootstrap interval, the Spearman rank correlation of our Table 2 ranking with the paper's, and
  paired comparisons of the variants of one student (paired bootstrap of the six-task average,
  McNemar per task), each set beside the paper's difference where the paper has both rows;
* :func:`analysis_sections` lays them out as markdown.

All of it needs per-document correctness (``evaluate_tasks(..., per_doc=True)``, the default);
a run evaluated without it is listed as such and left out of the paired analyses.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

from . import compare as C
from . import study as S  # the tables; study never imports analysis (no cycle)
from . import results as R
from .evaluate import AVG, COLUMNS
from .paths import ROOT

# Paired questions inside one student: (variant a, variant b, what a - b measures).
PAIRS = (
    ("mm", "kd", "matrix mixing (stage 1), no QKV copy"),
    ("qkv", "kd", "QKV copy"),
    ("qkv-mm", "qkv", "matrix mixing after QKV copy"),
    ("qkv-mm-h2h", "qkv-mm", "hidden-to-hidden alignment (stage 2)"),
    ("qkv-mm-h2h", "mm-h2h", "QKV copy in the full recipe"),
    ("qkv-mm-h2h", "kd", "full recipe against distillation alone"),
    # beyond the paper: the project's recipe (QKV copy, readout fit, attention transfer, then KD)
    ("qkv-fit-at", "kd", "the project's recipe against distillation alone"),
    ("qkv-fit-at", "mm", "the project's recipe against matrix mixing + distillation"),
    ("qkv-fit-at-gi", "qkv-fit-at", "the gate initialisation from the teacher, in the recipe"),
)
# Columns of the study ranked against the paper: (our variant, the paper's Table 2 variant whose
# Avg. per student is the reference). The project's recipe has no paper row; it is ranked
# against the paper's better column (with MM), to ask whether the mixers' order survives
# another recipe.
RANKED_COLUMNS = (("kd", "kd"), ("mm", "mm"), ("qkv-fit-at", "mm"))
ITERS = 2000  # bootstrap resamples on the page: interval ends move by < 0.1 point beyond this


def _stages_total(run, key: str):
    """Sum of ``key`` over the run's finished stages' done.json (None when none finished)."""
    values = []
    for stage in run.stages_done:
        path = run.dir / f"stage{stage}" / "done.json"
        if path.exists():
            value = json.loads(path.read_text()).get(key)
            if value is not None:
                values.append(value)
    return sum(values) if values else None


_EVAL_ORDER = ("stage3", "stage2", "stage1", "stage0", "conversion")


def _last_eval(run, key: str):
    for after in _EVAL_ORDER:
        if key in run.evals.get(after, {}):
            return run.evals[after][key]
    return None


def _last_eval_point(run) -> str | None:
    """After which stage the record's ``ppl``/``kl`` were taken: a run still in progress has
    only its earlier points (e.g. "conversion"), which must not read as its final numbers."""
    return next((a for a in _EVAL_ORDER if "perplexity" in run.evals.get(a, {})), None)


def study_record(runs, outputs, metric: str = "acc") -> tuple[dict, list[dict]]:
    """(teacher record, run records) of :mod:`linearize.results` for the runs under ``outputs``."""
    from .study import teacher_name, teacher_results

    res, _ = teacher_results(outputs)
    ppl = [r.evals[a]["teacher_perplexity"] for r in runs for a in r.evals if "teacher_perplexity" in r.evals[a]]
    name = str(res["model"]).removeprefix("teacher: ") if res else (teacher_name(runs, outputs) or "unknown")
    teacher = R.teacher_record(name, ppl[0] if ppl else None, R.tasks_from_eval(res, metric))
    records = [R.run_record(r.arch, r.variant, bool(r.params.get("hybrid", False)), _stages_total(r, "tokens"),
                            _stages_total(r, "wall_s"), _last_eval(r, "perplexity"), _last_eval(r, "kl"),
                            R.tasks_from_eval(r.results, metric), run=r.label, preset=r.preset,
                            evaluated=r.results is not None, ppl_after=_last_eval_point(r))
               for r in runs]
    return teacher, records


def with_stderr(frame, runs, outputs, metric: str = "acc"):
    """A copy of a ``study.paper_table`` frame whose task and Avg. cells read 'acc ± stderr'
    (percent), looked up by each row's run (or the teacher)."""
    from .study import teacher_results

    by_run = {r.label: r.results for r in runs}
    teacher, _ = teacher_results(outputs) if outputs is not None else (None, None)
    out = frame.copy()
    cols = [*COLUMNS.values(), AVG]
    for col in cols:
        out[col] = out[col].astype(object)
    for key, row in frame.iterrows():
        res = teacher if row["run"] == "teacher" else by_run.get(row["run"])
        tasks = R.tasks_from_eval(res, metric) if res else {}
        for task, col in COLUMNS.items():
            out.at[key, col] = R.cell(tasks[task]["acc"], tasks[task]["stderr"], 2) if task in tasks else R.MISSING
        acc, se = R.average(tasks)
        out.at[key, AVG] = R.cell(acc, se, 2)
    return out


def _correct(results, metric):
    if results is None:
        return None
    try:
        return C.correctness(results, metric if metric in ("acc", "acc_norm") else "acc")
    except C.CompareError:
        return None


def analysis(runs, outputs, metric: str = "acc", iters: int = ITERS) -> dict:
    """Margins, the Table 2 rank correlation and the within-student paired comparisons."""
    from .study import TABLE2_VARIANTS, paper_average, teacher_results

    teacher_res, _ = teacher_results(outputs)
    teacher_doc = _correct(teacher_res, metric)
    docs = {r.label: _correct(r.results, metric) for r in runs}
    out = {"chance": dict(C.CHANCE), "iters": iters, "metric": metric,
           "without_per_doc": [r.label for r in runs if r.results is not None and docs[r.label] is None],
           "margins": {}, "spearman_table2": None, "pairs": []}
    full = [t for t in R.TASKS]
    if teacher_doc and all(t in teacher_doc for t in full):
        for r in runs:
            d = docs[r.label]
            if d and all(t in d for t in full):
                try:
                    out["margins"][r.label] = C.margin_bootstrap(d, teacher_doc, full, iters=iters)
                except C.CompareError as err:
                    out["margins"][r.label] = {"error": str(err)}
    table2 = {r.paper_label: docs[r.label] for r in runs
              if r.variant in TABLE2_VARIANTS and docs[r.label] and all(t in docs[r.label] for t in full)}
    reference = {label: paper_average(label) for label in table2}
    reference = {k: v for k, v in reference.items() if math.isfinite(v)}
    if len(reference) >= 3:
        out["spearman_table2"] = C.spearman_bootstrap(table2, reference, full, iters=iters)
    by_key = {(r.arch, r.variant): r for r in runs}
    for arch in dict.fromkeys(r.arch for r in runs):
        for va, vb, question in PAIRS:
            a, b = by_key.get((arch, va)), by_key.get((arch, vb))
            if not (a and b and docs[a.label] and docs[b.label]):
                continue
            tasks = [t for t in full if t in docs[a.label] and t in docs[b.label]]
            res = C.compare(docs[a.label], docs[b.label], tasks, iters=iters)
            paper = paper_average(a.paper_label) - paper_average(b.paper_label)
            out["pairs"].append({"arch": arch, "a": a.label, "b": b.label, "question": question,
                                 "paper_diff": paper / 100 if math.isfinite(paper) else None,
                                 "verdict": verdict(res["avg"], paper), **res})
    out["rankings"] = rankings(runs, docs, iters)
    return out


def _finite(x):
    """JSON has no NaN: a number the paper does not give is None."""
    return x if x is not None and math.isfinite(x) else None


def _full(d) -> bool:
    return bool(d) and all(t in d for t in R.TASKS)


def rankings(runs, docs: Mapping, iters: int = ITERS) -> list[dict]:
    """Per column of :data:`RANKED_COLUMNS` with at least three students evaluated on all six
    tasks: the students ranked by our six-task average (with its stderr, validation KL and the
    paper's Avg.), Spearman's rho of that ranking with the paper's (bootstrap interval over
    documents), and rho of the ranking by validation KL (lower is better; a point estimate: KL
    is measured on one fixed set of blocks)."""
    from .study import PAPER_NAMES, paper_average, variant_suffix

    out = []
    for ours, paper_variant in RANKED_COLUMNS:
        cell = [r for r in runs if r.variant == ours and _full(docs.get(r.label))]
        if len(cell) < 3:
            continue
        rows = []
        for r in cell:
            acc, se = R.average(R.tasks_from_eval(r.results))
            paper_label = f"Llama-{PAPER_NAMES.get(r.arch, r.arch)}{variant_suffix(paper_variant)}"
            rows.append({"run": r.label, "arch": r.arch, "avg": acc, "stderr": se, "kl": _last_eval(r, "kl"),
                         "ppl": _last_eval(r, "perplexity"), "paper_label": paper_label,
                         "tokens": _stages_total(r, "tokens"), "wall_s": _stages_total(r, "wall_s"),
                         "paper_avg": _finite(paper_average(paper_label))})
        rows.sort(key=lambda x: -x["avg"])
        entry = {"variant": ours, "paper_variant": paper_variant, "students": rows, "spearman": None,
                 "spearman_kl": None, "spearman_subquadratic": None}
        ref = {x["paper_label"]: x["paper_avg"] for x in rows if x["paper_avg"] is not None}
        if len(ref) >= 3:
            models = {x["paper_label"]: docs[x["run"]] for x in rows if x["paper_label"] in ref}
            entry["spearman"] = C.spearman_bootstrap(models, ref, list(R.TASKS), iters=iters)
            # the softmax student keeps exact attention, first in the paper's ranking (and in
            # ours once trained; at chance, as the grid's kd cells are, it can be anywhere): the
            # same rho over the subquadratic students alone says whether the mixers' order agrees,
            # not only where attention stands
            linear = {k: v for k, v in ref.items()
                      if next(x["arch"] for x in rows if x["paper_label"] == k) not in EXACT_ATTENTION}
            if len(linear) >= 3 and len(linear) < len(ref):
                entry["spearman_subquadratic"] = C.spearman_bootstrap(
                    {k: models[k] for k in linear}, linear, list(R.TASKS), iters=iters)
            with_kl = [x for x in rows if x["paper_label"] in ref and x["kl"] is not None]
            if len(with_kl) >= 3:
                entry["spearman_kl"] = _finite(C.spearman([-x["kl"] for x in with_kl],
                                                          [x["paper_avg"] for x in with_kl]))
        out.append(entry)
    return out


EXACT_ATTENTION = ("softmax", "llama")  # students that keep the teacher's softmax attention


def _direction(sp: Mapping | None) -> str:
    """A ranking "holds" only when it agrees with the paper's beyond both kinds of chance: the
    documents' (the bootstrap interval excludes 0) and the ordering's (a random order of these
    students reaches the same rho with probability under 5%, exact permutation p)."""
    if not sp:
        return "not computed (fewer than three students with a paper number)"
    where = (f"rho {sp['rho']:.2f}, 95% interval {sp['lo']:.2f} to {sp['hi']:.2f}, {sp['n']} students, "
             f"permutation p {sp.get('p_agree', float('nan')):.2f}")
    if sp["lo"] > 0 and sp.get("p_agree", 1.0) < 0.05:
        return f"holds ({where})"
    if sp["hi"] < 0 and sp.get("p_reverse", 1.0) < 0.05:
        return f"is reversed ({where})"
    if sp["lo"] > 0 or sp["hi"] < 0:
        return (f"is not determined yet: the documents separate the students, but a random order of "
                f"{sp['n']} students reaches this rho too often ({where})")
    return f"is not determined at this budget: the interval covers 0 ({where})"


def _exact_attention_place(rows: list[Mapping]) -> str:
    """Where the softmax student stands among ``rows`` in our ranking (rows sorted by average)
    and in the paper's, in words: "first in both rankings", or "5th of 10 here, 1st in the paper"."""
    def place(order: list[Mapping]) -> int | None:
        return next((i + 1 for i, x in enumerate(order) if x["arch"] in EXACT_ATTENTION), None)

    ranked = [x for x in rows if x["paper_avg"] is not None]
    ours = place(ranked)
    paper = place(sorted(ranked, key=lambda x: -x["paper_avg"]))
    if ours == paper == 1:
        return "first in both rankings"
    return f"{_ordinal(ours)} of {len(ranked)} here, {_ordinal(paper)} in the paper"


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th ... 11th, 12th, 13th ... 21st."""
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def findings(result: Mapping) -> list[str]:
    """The paper's findings, each said in words with what our measurements say of it."""
    out = []
    for entry in result.get("rankings") or []:
        col = entry["variant"]
        against = "same column" if col == entry["paper_variant"] else f"`{entry['paper_variant']}` column"
        kl = entry.get("spearman_kl")
        kl_text = "" if kl is None else f" Ranked by validation KL instead, rho is {kl:.2f}."
        sub = entry.get("spearman_subquadratic")
        sub_text = ("" if not sub else f" Over the subquadratic students alone (the softmax student, "
                    f"{_exact_attention_place(entry['students'])}, left out) the ranking {_direction(sub)}.")
        out.append(f"- **The ranking of the mixers** (`{col}`, against the paper's {against}) "
                   f"{_direction(entry.get('spearman'))}.{kl_text}{sub_text}")
    by_question: dict[str, list[dict]] = {}
    for p in result.get("pairs") or []:
        by_question.setdefault(p["question"], []).append(p)
    for question, pairs in by_question.items():
        better = [p["arch"] for p in pairs if p["avg"]["lo"] > 0]
        worse = [p["arch"] for p in pairs if p["avg"]["hi"] < 0]
        open_ = [p["arch"] for p in pairs if p["arch"] not in better + worse]
        with_paper = [p for p in pairs if p["paper_diff"] is not None]
        names = lambda xs: ", ".join(xs) if xs else "none"  # noqa: E731
        paper = ""
        if with_paper:
            ups = [p["arch"] for p in with_paper if 100 * p["paper_diff"] >= PAPER_TIE]
            downs = [p["arch"] for p in with_paper if 100 * p["paper_diff"] <= -PAPER_TIE]
            ties = [p["arch"] for p in with_paper if p["arch"] not in ups + downs]
            paper = (f" The paper (no intervals): better for {names(ups)}; worse for {names(downs)}; "
                     f"within {PAPER_TIE} points for {names(ties)}.")
        out.append(f"- **{question}** (a - b, six-task average, paired 95% interval): better for "
                   f"{names(better)}; worse for {names(worse)}; not separated for {names(open_)}.{paper}")
    margins = {k: m for k, m in (result.get("margins") or {}).items() if "error" not in m}
    if margins:
        above = [k for k, m in margins.items() if m["lo"] > 0]
        out.append(f"- **Above chance:** {len(above)} of {len(margins)} runs keep a margin over chance whose "
                   "95% interval excludes 0" + (f" ({', '.join(f'`{k}`' for k in above)})" if above else "") + ".")
    return out


# The paper reports averages to two decimals from one run each: a difference below half a
# point is no finding to confirm or contradict.
PAPER_TIE = 0.5


def verdict(avg: Mapping, paper_diff_percent: float) -> str:
    """Whether our paired interval of the average difference agrees with the paper's sign."""
    if not (avg["lo"] > 0 or avg["hi"] < 0):
        return "undecided (interval covers 0)"
    ours = "a > b" if avg["lo"] > 0 else "a < b"
    if not math.isfinite(paper_diff_percent):
        return ours
    if abs(paper_diff_percent) < PAPER_TIE:
        return f"{ours}; the paper: within {PAPER_TIE} points"
    agree = (avg["lo"] > 0) == (paper_diff_percent > 0)
    return "agrees with the paper" if agree else "contradicts the paper"


def _pm(x) -> str:
    return R.MISSING if x is None or not math.isfinite(x) else f"{100 * x:+.2f}"


def analysis_sections(result: Mapping) -> list[str]:
    """Markdown sections for the page."""
    sections = []
    said = findings(result)
    if said:
        sections.append("\n".join(["## What holds here of the paper's findings", "",
                                   "Generated from the paired analyses below; a finding whose interval covers 0 is "
                                   "reported as not determined, never as holding.", "", *said]))
    for entry in result.get("rankings") or []:
        rows = [f"## Students ranked under `{entry['variant']}`", "",
                f"By our six-task average (± stderr); `paper Avg.` is the paper's `{entry['paper_variant']}` "
                "row of the same student. val ppl and KL: held-out validation after the last stage; tokens and "
                "minutes: training, all stages.", "",
                "| rank | run | Avg. | KL | val ppl | tokens | train min | paper Avg. |",
                "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for i, x in enumerate(entry["students"], 1):
            num = lambda v, f: R.MISSING if v is None or not math.isfinite(v) else format(v, f)  # noqa: E731
            rows.append(f"| {i} | {x['run']} | {R.cell(x['avg'], x['stderr'], 2)} | {num(x['kl'], '.3f')} | "
                        f"{num(x['ppl'], '.1f')} | {num(x['tokens'], ',')} | "
                        f"{num(None if x['wall_s'] is None else x['wall_s'] / 60, '.0f')} | {num(x['paper_avg'], '.2f')} |")
        sections.append("\n".join(rows))
    sp = result.get("spearman_table2")
    lines = ["## Ranking against the paper's Table 2", ""]
    if sp:
        lines += [f"Spearman rank correlation of our six-task average with the paper's Avg. over the "
                  f"{sp['n']} Table 2 rows we have: **{sp['rho']:.2f}** (95% bootstrap interval over documents "
                  f"{sp['lo']:.2f} to {sp['hi']:.2f}, {sp['iters']} resamples; documents per task: "
                  + ", ".join(f"{R.LABELS[t]} {n}" for t, n in sp["docs"].items()) + ")."]
    else:
        lines += ["Needs at least three Table 2 runs (`kd` or `mm`) evaluated on all six tasks with "
                  "per-document results."]
    sections.append("\n".join(lines))
    margins = result.get("margins") or {}
    if margins:
        rows = ["## Above-chance margin", "",
                "(student Avg. - chance Avg.) / (teacher Avg. - chance Avg.): 1 keeps all of the teacher's "
                "lead over chance, 0 is chance. 95% interval from resampling documents (the same for "
                "student and teacher).", "", "| run | margin | 95% interval |", "|---|---:|---:|"]
        for label, m in margins.items():
            if "error" in m:
                rows.append(f"| {label} | - | {m['error']} |")
            else:
                rows.append(f"| {label} | {m['margin']:.3f} | {m['lo']:.3f} to {m['hi']:.3f} |")
        sections.append("\n".join(rows))
    pairs = result.get("pairs") or []
    rows = ["## Paired comparisons within a student", "",
            "On the same documents: a - b in accuracy points, the six-task average with its 95% paired "
            "bootstrap interval and p-value, and McNemar's exact p per task (discordant documents only). "
            "`paper` is the paper's a - b in Avg. where it has both rows; the verdict says whether our "
            "interval excludes 0 and, if so, whether it has the paper's sign."]
    if pairs:
        head = ["a", "b", "question", "Avg. a - b [95%]", "p", "paper", "verdict",
                *(f"McNemar {R.LABELS[t]}" for t in R.TASKS)]
        rows += ["", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
        for p in pairs:
            avg = p["avg"]
            mc = [C.format_p(p["mcnemar"][t]["p"]) if t in p["mcnemar"] else R.MISSING for t in R.TASKS]
            rows.append("| " + " | ".join([p["a"], p["b"], p["question"],
                                           f"{_pm(avg['diff'])} [{_pm(avg['lo'])}, {_pm(avg['hi'])}]",
                                           C.format_p(avg["p"]), _pm(p["paper_diff"]), p["verdict"], *mc]) + " |")
    else:
        rows += ["", "No student has two variants of these pairs evaluated with per-document results yet."]
    if result.get("without_per_doc"):
        rows += ["", "Evaluated without per-document results (left out; rerun notebook 03): "
                 + ", ".join(f"`{x}`" for x in result["without_per_doc"]) + "."]
    sections.append("\n".join(rows))
    return sections


def grid_status(runs, outputs, preset: str, grid: str) -> dict:
    """How far the runner's grid ``grid`` under ``preset`` is in ``outputs``: its cells (student,
    variant), which are trained and which evaluated, the token budget of each variant and the
    machine time its finished steps took (from the runner's step markers)."""
    from . import runner
    from .mixers import available

    outputs = Path(outputs)
    by_dir = {r.dir.resolve(): r for r in runs}
    cells, seconds = [], 0.0
    for step in runner.plan(available(), preset, grid=grid):
        try:  # the plan names folders under the runner's outputs; this page may read another
            here = outputs / step.output.relative_to(runner.OUTPUTS)
        except ValueError:
            continue
        marker = here.with_suffix(".done")
        done = marker.exists()  # written only after the step succeeded (a snapshot keeps no notebooks)
        if done:
            try:
                seconds += float(json.loads(marker.read_text()).get("seconds") or 0.0)
            except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
                pass
        if step.notebook != "03_evaluate.ipynb" or here.parent.name == "teacher":
            continue
        run = by_dir.get(here.parent.resolve())
        cells.append({"run": f"{here.parent.parent.name}/{here.parent.name}", "trained": bool(run and run.finished),
                      "evaluated": done})
    tokens = {}
    for r in runs:
        if r.preset == preset and r.finished:
            tokens.setdefault(r.variant, {f"stage{s}": int(json.loads((r.dir / f"stage{s}" / "done.json").read_text())
                                                           .get("tokens") or 0) for s in r.stages_done})
    return {"preset": preset, "grid": grid, "cells": cells, "evaluated": sum(c["evaluated"] for c in cells),
            "trained": sum(c["trained"] for c in cells), "machine_seconds": seconds, "tokens_by_variant": tokens}


def grid_section(status: Mapping) -> str:
    hours = status["machine_seconds"] / 3600
    lines = [f"## The grid: {status['evaluated']} of {len(status['cells'])} cells finished", "",
             f"`make grid` (preset `{status['preset']}`, grid `{status['grid']}`): {status['trained']} "
             f"{'cell' if status['trained'] == 1 else 'cells'} trained, "
             f"{status['evaluated']} evaluated; the finished steps took {hours:.1f} hours of this machine "
             "(the runner's step markers). The runner resumes where it stopped; a cell is on this page "
             "as soon as its evaluation is done.", "",
             "Training tokens per stage of each variant (stage 0: attention transfer, 1: matrix mixing, "
             "2: hidden-to-hidden, 3: end-to-end distillation):", ""]
    for variant, tok in status["tokens_by_variant"].items():
        lines.append(f"- `{variant}`: " + ", ".join(f"{k} {v:,}" for k, v in sorted(tok.items())))
    left = [c["run"] for c in status["cells"] if not c["evaluated"]]
    if left:
        lines += ["", "Not finished yet: " + ", ".join(f"`{x}`" for x in left) + "."]
    return "\n".join(lines)


def write_results_page(path: str | os.PathLike, outputs: str | os.PathLike, runs: list["S.StudyRun"],
                       figures: Mapping[str, Path | list[Path] | None], metric: str = "acc",
                       grid: tuple[str, str] | None = None) -> Path:
    """Write the markdown results page: the tables (built here from ``outputs``; every accuracy
    with its stderr), the paired analyses of :mod:`linearize.analysis` and links to the figures
    (``figures``: section title -> PNG path(s), None for a missing one); and beside it its JSON
    twin (``results.json`` for ``results.md``) in the schema of :mod:`linearize.results`.
    ``grid``: (preset, grid name) of the runner's grid this page reports, for its progress."""
    from .results import results_record, write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    teacher_res, teacher_path = S.teacher_results(outputs)
    paper_teacher = next(row for key, row in S.PAPER_ROWS.items() if key.endswith(": teacher"))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    shown = Path(outputs).resolve()
    if shown.is_relative_to(ROOT):  # no machine-specific absolute paths in a committed page
        shown = shown.relative_to(ROOT)
    lines = [
        "# Results",
        "",
        f"Generated by `notebooks/05_study.ipynb` (`linearize.analysis`) from `{shown}/` on {when}, with "
        "its JSON twin `results.json` beside it; do not edit by hand. "
        + ("Regenerate both from the grid's committed records with `make grid-snapshot && make grid-page`, "
           "or go on with the grid first (`make grid`)." if grid else "Rerun the study to refresh both."),
        "",
        f"Teacher: `{S.teacher_name(runs, outputs) or 'unknown'}`. Runs: {len(runs)} "
        f"({', '.join(f'`{r.label}`' for r in runs) or 'none yet'}). Zero-shot accuracy in percent "
        f"({'acc_norm where defined' if metric == 'acc_norm' else 'unnormalised acc'}), over the first "
        "`docs/task` documents of each task; Avg. only when all six tasks were run. `paper Avg.` is the "
        "source paper's (SmolLM-360M teacher, 1B FineWeb tokens; its LAMBADA mixes standard and OpenAI, "
        "ours is OpenAI only), so compare rankings, not absolute numbers. `-` marks a cell we have not "
        "measured.",
        "",
        "The paper's teacher per task: " + ", ".join(f"{k} {v:.2f}" for k, v in paper_teacher.items()) + ".",
        "",
    ]
    status = grid_status(runs, outputs, *grid) if grid else None
    if status:
        lines += [grid_section(status), ""]
    if any(r.variant in S.RECIPE_VARIANTS for r in runs):
        lines += [
            "## The project's recipe (beyond the paper): QKV copy, readout fit, attention transfer, distillation",
            "",
            "Every layer's o_proj fitted in closed form, then every mixer regressed onto the teacher's attention "
            "output from the teacher's own layer inputs (stage 0), then end-to-end distillation (docs/recipe.md). "
            "`+ gate init` (the five gated students): each head's decay gate first set from how far the "
            "teacher's head looks back (docs/gate_init.md).",
            "",
            S.markdown_table(with_stderr(S.table_recipe(runs, outputs, metric), runs, outputs, metric)),
            "",
        ]
    lines += [
        "## Table 2: students without and with matrix mixing",
        "",
        S.markdown_table(with_stderr(S.table2(runs, outputs, metric), runs, outputs, metric)),
        "",
        "## Table 3: Q/K/V copy, matrix mixing and hidden-to-hidden ablations",
        "",
        S.markdown_table(with_stderr(S.table3(runs, outputs, metric), runs, outputs, metric)),
        "",
    ]
    # what separates students: margins, the ranking against the paper's, paired comparisons
    paired = analysis(runs, outputs, metric)
    for section in analysis_sections(paired):
        lines += [section, ""]
    if any("fit" in r.variant.split("-") for r in runs):
        lines += [
            "## Beyond the paper: closed-form readout fit after conversion",
            "",
            "`fit`: every layer's o_proj solved by ridge least squares to the teacher's attention output "
            "(`linearize.calibrate`), before any training." + S._fit_stage2_note(runs),
            "",
            S.markdown_table(with_stderr(S.table_fit(runs, outputs, metric), runs, outputs, metric)),
            "",
        ]
    lines += [
        "## Validation perplexity and per-token KL to the teacher",
        "",
        S.markdown_table(S.validation_table(runs)),
        "",
    ]
    for title, target in figures.items():
        targets = [t for t in (target if isinstance(target, (list, tuple)) else [target]) if t]
        lines += [f"## {title}", ""]
        if not targets:
            lines += ["Not available yet (its step has not produced output).", ""]
            continue
        lines += [f"![{title}]({S._link(path, t)})" for t in targets] + [""]
    path.write_text("\n".join(lines))
    # the page's JSON twin (schema: linearize.results), written from the same runs
    teacher, records = study_record(runs, outputs, metric)
    extra = {"grid": status} if status else {}
    write_json(path.with_suffix(".json"), results_record(teacher, records, analysis=paired, **extra))
    return path
