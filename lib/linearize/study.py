"""The study's results, read back from ``outputs/``: runs, paper-format tables, curves, the
attention explorer over the saved students, the results page and the HTML export.

Why ~570 lines in one module: notebook 05 calls all of it as ``study.X`` over the same
``StudyRun`` records. The clean cut, reading run folders (``load_run``, ``find_runs``) apart from
the tables and figures drawn from them, waits for the one run-folder reader issue 17 asks for.

Everything here reads what the other steps wrote and trains nothing:

* run folders ``outputs/<arch>/<run_name>/`` of :mod:`linearize.stages` (``params.yaml``,
  ``metrics.jsonl`` with "step" and "eval" events, ``stageN/done.json``) and the zero-shot
  results that :func:`linearize.evaluate.save_results` put beside them (``eval_*.json``);
* the teacher's folder ``outputs/teacher/`` (``teacher.json`` from notebook 00, ``eval_*.json``);
* the benchmark CSV ``outputs/bench/bench.csv`` of :mod:`linearize.bench`.

A run's variant (the paper's Table 2 / Table 3 grid, ``linearize.runner.VARIANTS``) is read
from its stored parameters (``qkv_copy``, ``matrix_mixing``, ``h2h``), not from its folder
name, so a renamed folder is still placed in the right row. A cell with no measurement is
NaN in the frames and '-' on the page: numbers are never filled in.

``notebooks/05_study.ipynb`` is a thin layer over this module; ``export_html`` turns its
executed copy into a page that needs no kernel.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .evaluate import table_row
from .paper import AVG, COLUMNS, PAPER_NAMES, PAPER_ROWS
from .runs import read_metrics

# Folders of outputs/ that hold no student runs.
NON_RUN_DIRS = {"teacher", "bench", "study", "teacher_eval", "bench_mixers"}
STAGE_EVALS = ("conversion", "stage0", "stage1", "stage2", "stage3")  # stage0: attention transfer (beyond the paper)
# How the paper labels each training variant after "Llama-<student>".
VARIANT_SUFFIX = {
    "kd": "", "mm": " + MM", "qkv": " + QKV", "qkv-mm": " + QKV + MM",
    "qkv-mm-h2h": " + QKV + MM + H2H", "mm-h2h": " + MM + H2H (no QKV)", "h2h": " + H2H (no QKV)",
    "qkv-h2h": " + QKV + H2H",
    # beyond the paper: closed-form o_proj fit after conversion (linearize.calibrate)
    "qkv-fit": " + QKV + fit", "qkv-fit-mm-h2h": " + QKV + fit + MM + H2H",
    # beyond the paper: the project's recipe, readout fit then attention transfer (linearize.transfer)
    "qkv-fit-at": " + QKV + fit + AT (recipe, beyond the paper)",
    # beyond the paper: the recipe after the gate initialisation (linearize.gate_init)
    "qkv-fit-at-gi": " + QKV + gate init + fit + AT (recipe, beyond the paper)",
}
TABLE2_VARIANTS = ("kd", "mm")  # students without and with matrix mixing (no Q/K/V copy)
TABLE3_VARIANTS = ("qkv", "qkv-mm", "qkv-mm-h2h", "mm-h2h")  # the ablations
FIT_VARIANTS = ("qkv-mm-h2h", "qkv-fit", "qkv-fit-mm-h2h")  # the paper's best recipe beside the readout fit
RECIPE_VARIANTS = ("qkv-fit-at", "qkv-fit-at-gi")  # the project's recipe (the study grid's first column), and with gate init
TASK_COLUMNS = list(COLUMNS.values())
MISSING = "-"


class StudyError(ValueError):
    """An outputs folder or a request the study cannot read (names the fix)."""


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------
def variant_of(params: Mapping) -> str:
    """The variant name of ``runner.VARIANTS`` that a run's parameters describe: the parts
    "qkv", "fit" (readout fit), "at" (attention transfer), "mm", "h2h", "gi" (gate initialisation)
    that are switched on, joined by '-', or "kd" (stage 3 alone)."""
    flat = {**(params.get("overrides") or {}), **params}  # a runner step's notebook parameters nest some
    parts = [name for key, name in (("qkv_copy", "qkv"), ("readout_fit_tokens", "fit"),
                                    ("attention_transfer", "at"), ("matrix_mixing", "mm"),
                                    ("h2h", "h2h"), ("gate_init_tokens", "gi")) if flat.get(key)]
    # beyond the paper: a hybrid (softmax window) is its own variant, "<variant>-w64", never
    # shown as the paper's row of the same recipe
    window = _hybrid_part(flat)
    return "-".join(parts + [window] if window else parts) or "kd"


def _hybrid_part(params: Mapping) -> str:
    """'w64' (or 'w64s2' for other than the default sinks) for a hybrid run, else ''."""
    from .mixers import hybrid

    if not hybrid.is_hybrid(params):
        return ""
    options = {**(params.get("mixer_options") or {})}
    for key in ("hybrid_window", "hybrid_sinks"):
        if params.get(key) is not None and params.get("hybrid_window"):
            options[key] = params[key]
    return hybrid.format_name("", options).lstrip("+")


def variant_suffix(variant: str) -> str:
    """The label after "Llama-<student>": the paper's for its variants, and for a hybrid the
    recipe's then " + window 64 (hybrid, beyond the paper)"."""
    base, _, last = variant.rpartition("-")
    m = re.fullmatch(r"w(\d+)(?:s(\d+))?", last)
    if not m:
        return VARIANT_SUFFIX.get(variant, " + " + variant)
    sinks = f", {m[2]} sinks" if m[2] is not None else ""
    head = VARIANT_SUFFIX.get(base or "kd", " + " + (base or "kd"))
    return f"{head} + window {m[1]}{sinks} (hybrid, beyond the paper)"


# Names evaluate.save_results gives (evaluate.RESULTS_FILE); other eval_* files in a run folder
# (notebook 03's eval_perplexity_kl.json, eval_table.csv) are not zero-shot results.
RESULTS_NAME = re.compile(r"eval_(full|limit\d+)(_online)?\.json")


def _fit_stage2_note(runs: list[StudyRun]) -> str:
    """The stage-2 learning rates of the fitted runs with H2H, from what defined their stage 2
    (stage2/params.yaml; older fit runs used the preset's rate, later ones runner.FIT_STAGE2_LR)."""
    rates = set()
    for r in runs:
        parts = r.variant.split("-")
        stage2 = r.dir / "stage2" / "params.yaml"
        if "fit" in parts and "h2h" in parts and 2 in r.stages_done and stage2.exists():
            rates.add(float(yaml.safe_load(stage2.read_text())["stage2_lr"]))
    if not rates:
        return ""
    return f" `fit + MM + H2H` trained stage 2 at learning rate {', '.join(f'{x:g}' for x in sorted(rates))}."


def pick_results(folder: str | os.PathLike) -> tuple[dict | None, Path | None]:
    """The zero-shot results of a folder (``eval_<full|limitN>[_online].json``): the one over
    the most documents (``full`` before any ``limitN``, a larger N before a smaller), offline
    before online."""
    best, best_key, best_path = None, None, None
    for path in sorted(Path(folder).glob("eval_*.json")):
        if not RESULTS_NAME.fullmatch(path.name):
            continue
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StudyError(f"{path} is not valid JSON ({err}); delete it and rerun notebook 03.") from err
        limit = res.get("limit")
        key = (math.inf if limit is None else float(limit), not res.get("online", False))
        if best_key is None or key > best_key:
            best, best_key, best_path = res, key, path
    return best, best_path


@dataclass
class StudyRun:
    """One student run folder and what it produced."""

    arch: str
    variant: str
    preset: str
    dir: Path
    params: dict
    evals: dict = field(default_factory=dict)  # after -> the "eval" record of metrics.jsonl
    stages_done: list = field(default_factory=list)
    results: dict | None = None  # zero-shot results (evaluate_tasks), if evaluated
    results_path: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.arch}/{self.dir.name}"

    @property
    def paper_label(self) -> str:
        name = PAPER_NAMES.get(self.arch, self.arch)
        return f"Llama-{name}{variant_suffix(self.variant)}"

    @property
    def hybrid(self) -> bool:
        """A student with a softmax window beside its linear branch (beyond the paper)."""
        from .mixers.hybrid import is_hybrid

        return is_hybrid(self.params)

    @property
    def finished(self) -> bool:
        """All stages the run asked for have a done.json."""
        from .stages import STAGES

        wanted = [n for n, spec in STAGES.items() if self.params.get(spec.flag)]  # a flag older runs lack is off
        return all(s in self.stages_done for s in wanted)


def load_run(folder: str | os.PathLike) -> StudyRun:
    folder = Path(folder)
    params_path = folder / "params.yaml"
    if not params_path.exists():
        raise StudyError(f"{folder} is not a run folder: it has no params.yaml (written by linearize.stages).")
    params = yaml.safe_load(params_path.read_text())
    evals = {r["after"]: r for r in read_metrics(folder) if r.get("event") == "eval"}
    done = sorted(int(p.parent.name[5:]) for p in folder.glob("stage[0-9]/done.json"))
    results, results_path = pick_results(folder)
    return StudyRun(arch=params.get("arch", folder.parent.name), variant=variant_of(params),
                    preset=str(params.get("preset", "?")), dir=folder, params=params, evals=evals,
                    stages_done=done, results=results, results_path=results_path)


def find_runs(outputs: str | os.PathLike = "outputs", students=None, presets=None) -> list[StudyRun]:
    """Every run folder ``outputs/<arch>/<run_name>/`` (one with params.yaml), sorted by
    student then variant. ``students``: None for all, else student names ("gla") or run
    labels ("gla/cpu-quick-kd"), as a list or a comma-separated string. ``presets``: None for
    all, else the presets whose runs to keep (a study's page shows its own runs, not every
    experiment that shares the outputs folder)."""
    outputs = Path(outputs)
    if not outputs.is_dir():
        raise StudyError(f"outputs folder {outputs} does not exist: run the study first (make study) "
                         "or pass the folder that holds the runs.")
    runs = [load_run(p.parent) for p in sorted(outputs.glob("*/*/params.yaml"))
            if p.parent.parent.name not in NON_RUN_DIRS]
    if students not in (None, "", "all"):
        wanted = [s.strip() for s in students.split(",")] if isinstance(students, str) else list(students)
        known = {r.arch for r in runs} | {r.label for r in runs}
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise StudyError(f"no runs for {unknown} under {outputs}; found: {sorted(known)}")
        runs = [r for r in runs if r.arch in wanted or r.label in wanted]
    if presets not in (None, "", "all"):
        keep = {p.strip() for p in presets.split(",")} if isinstance(presets, str) else set(presets)
        runs = [r for r in runs if r.preset in keep]
    order = {v: i for i, v in enumerate(dict.fromkeys((*RECIPE_VARIANTS, *TABLE2_VARIANTS, *TABLE3_VARIANTS,
                                                      *FIT_VARIANTS)))}
    return sorted(runs, key=lambda r: (r.arch, r.preset, order.get(r.variant, 99), r.dir.name))


def runs_frame(runs: list[StudyRun]):
    """One line per run: where it is, which variant, which stages finished, evaluated or not."""
    import pandas as pd

    return pd.DataFrame([{
        "run": r.label, "student": r.arch, "variant": r.variant, "hybrid": r.hybrid, "preset": r.preset,
        "stages done": ",".join(map(str, r.stages_done)) or MISSING, "finished": r.finished,
        "zero-shot": r.results_path.name if r.results_path else MISSING,
    } for r in runs], columns=["run", "student", "variant", "hybrid", "preset", "stages done", "finished",
                               "zero-shot"])


# ---------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------
def teacher_name(runs: list[StudyRun], outputs: str | os.PathLike | None = None) -> str | None:
    """The teacher the runs were distilled from (the most common one), else notebook 00's."""
    names = Counter(str(r.params.get("teacher")) for r in runs if r.params.get("teacher"))
    if names:
        return names.most_common(1)[0][0]
    summary = teacher_summary(outputs) if outputs is not None else None
    return summary.get("teacher") if summary else None


def teacher_summary(outputs: str | os.PathLike) -> dict | None:
    path = Path(outputs) / "teacher" / "teacher.json"
    return json.loads(path.read_text()) if path.exists() else None


def teacher_results(outputs: str | os.PathLike) -> tuple[dict | None, Path | None]:
    return pick_results(Path(outputs) / "teacher")


# ---------------------------------------------------------------------------------------
# Paper-format tables
# ---------------------------------------------------------------------------------------
def paper_average(label: str) -> float:
    """The paper's Avg. for a row label like "Llama-GLA + MM" (NaN when the paper has none)."""
    for key, row in PAPER_ROWS.items():
        if key.split(": ", 1)[-1] == label:
            return row.get(AVG, math.nan)
    return math.nan


def _docs(results: dict | None) -> str:
    if results is None:
        return MISSING
    return "all" if results.get("limit") is None else str(results["limit"])


def _stage3(run: StudyRun, key: str) -> float:
    return float(run.evals.get("stage3", {}).get(key, math.nan))


def paper_table(runs: list[StudyRun], variants, outputs: str | os.PathLike | None = None, metric: str = "acc"):
    """Rows like the paper's tables: the teacher, then per student each of ``variants``.

    A row is shown when we have that run or the paper has that row (for a student we ran), so
    the paper's number stands next to ours or next to '-'. Columns: the six tasks and Avg. in
    percent (ours; Avg. only over all six), ``paper Avg.``, validation perplexity and per-token
    KL to the teacher after stage 3, the documents per task, and the run folder. Several
    presets of one student and variant give one row each."""
    import pandas as pd

    columns = ["run", *TASK_COLUMNS, AVG, "paper Avg.", "val ppl", "KL", "docs/task"]
    rows: dict[str, dict] = {}
    if outputs is not None:
        res, path = teacher_results(outputs)
        if res is not None or runs:
            ppl = [r.evals[a]["teacher_perplexity"] for r in runs for a in r.evals if "teacher_perplexity" in r.evals[a]]
            name = str(res["model"]).removeprefix("teacher: ") if res else None
            label = f"teacher ({name})" if name else "teacher"
            rows[label] = {"run": "teacher", **(table_row(res, metric) if res else {}),
                           "paper Avg.": paper_average("teacher"), "val ppl": ppl[0] if ppl else math.nan,
                           "docs/task": _docs(res)}
    presets = {r.preset for r in runs}
    for arch in dict.fromkeys(r.arch for r in runs):
        for variant in variants:
            mine = [r for r in runs if r.arch == arch and r.variant == variant]
            label = f"Llama-{PAPER_NAMES.get(arch, arch)}{variant_suffix(variant)}"
            paper = paper_average(label)
            if not mine and math.isnan(paper):
                continue
            for run in mine or [None]:
                row = {"run": run.label if run else MISSING, "paper Avg.": paper}
                if run is not None:
                    if run.results is not None:
                        row.update(table_row(run.results, metric))
                    row.update({"val ppl": _stage3(run, "perplexity"), "KL": _stage3(run, "kl"),
                                "docs/task": _docs(run.results)})
                key = label if run is None or len(presets) == 1 else f"{label} [{run.preset}]"
                if run is not None and len(mine) > 1 and len({r.preset for r in mine}) < len(mine):
                    key = f"{label} [{run.dir.name}]"  # several runs of one preset: one row each
                rows[key] = row
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=columns) if rows else pd.DataFrame(columns=columns)
    frame.index.name = "model"
    for col in columns:
        if col not in ("run", "docs/task"):
            frame[col] = frame[col].astype(float)
    frame[["run", "docs/task"]] = frame[["run", "docs/task"]].fillna(MISSING)
    return frame


def table2(runs, outputs=None, metric="acc"):
    """The paper's Table 2: students trained without (``kd``) and with matrix mixing (``mm``)."""
    return paper_table(runs, TABLE2_VARIANTS, outputs, metric)


def table3(runs, outputs=None, metric="acc"):
    """The paper's Table 3: Q/K/V copy, matrix mixing and hidden-to-hidden ablations."""
    return paper_table(runs, TABLE3_VARIANTS, outputs, metric)


def table_recipe(runs, outputs=None, metric="acc"):
    """Beyond the paper: every student trained with the project's recipe (``qkv-fit-at``)."""
    return paper_table([r for r in runs if r.variant in RECIPE_VARIANTS], RECIPE_VARIANTS, outputs, metric)


def table_hybrid(runs, outputs=None, metric="acc"):
    """Beyond the paper: every hybrid run (a softmax window beside the student) next to the run
    of the same student and recipe without the window."""
    hybrid = [r.variant for r in runs if r.hybrid]
    variants = dict.fromkeys(v for h in hybrid for v in (h.rpartition("-")[0] or "kd", h))
    return paper_table([r for r in runs if r.variant in variants], list(variants), outputs, metric)


def table_fit(runs, outputs=None, metric="acc"):
    """Beyond the paper: its best recipe (QKV + MM + H2H) beside the same student with the
    closed-form readout fit after conversion, alone (``qkv-fit``) and before MM + H2H."""
    fitted = {r.arch for r in runs if "fit" in r.variant.split("-")}
    return paper_table([r for r in runs if r.arch in fitted], FIT_VARIANTS, outputs, metric)


def validation_table(runs: list[StudyRun]):
    """Validation perplexity and per-token KL(teacher || student) after conversion and after
    each stage, one row per run (a stage the variant skips is '-')."""
    import pandas as pd

    rows = {}
    for r in runs:
        row = {}
        for metric, name in (("perplexity", "ppl"), ("kl", "KL")):
            for after in STAGE_EVALS:
                row[f"{name} {after}"] = float(r.evals.get(after, {}).get(metric, math.nan))
        rows[r.label] = row
    cols = [f"{n} {a}" for n in ("ppl", "KL") for a in STAGE_EVALS]
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=cols) if rows else pd.DataFrame(columns=cols)
    frame.index.name = "run"
    return frame.astype(float)


def show(frame, decimals: int = 2):
    """The frame for display: numbers rounded, missing cells '-'."""
    def fmt(v):
        if isinstance(v, float):
            return MISSING if math.isnan(v) else f"{v:.{decimals}f}"
        return MISSING if v is None else str(v)

    return frame.apply(lambda col: col.map(fmt))


def markdown_table(frame, decimals: int = 2) -> str:
    """A GitHub-markdown table of a frame (index first), missing cells '-'."""
    shown = show(frame, decimals)
    header = [frame.index.name or "", *map(str, shown.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(shown.columns)) + "|"]
    for label, row in shown.iterrows():
        cells = [str(label).replace("|", "\\|"), *(str(v).replace("|", "\\|") for v in row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------
def steps_frame(runs: list[StudyRun]):
    """Every logged training step of every run: run, student, variant, stage, tokens, loss."""
    import pandas as pd

    records = []
    for r in runs:
        for m in read_metrics(r.dir):
            if m.get("event") == "step":
                records.append({"run": r.label, "student": r.arch, "variant": r.variant, "stage": m["stage"],
                                "step": m["step"], "tokens": m["tokens"], "loss": m["loss"]})
    return pd.DataFrame(records, columns=["run", "student", "variant", "stage", "step", "tokens", "loss"])


def layer_losses_frame(runs: list[StudyRun]):
    """Per-layer loss of stages 1 and 2 at the first ("before") and last ("after") logged step of
    each run (the layer_losses that stages.py logs with every step): run, student, variant, stage,
    when, step, layer, loss."""
    import pandas as pd

    records = []
    for r in runs:
        steps = [m for m in read_metrics(r.dir) if m.get("event") == "step" and m.get("layer_losses")]
        for stage in sorted({m["stage"] for m in steps}):
            logged = [m for m in steps if m["stage"] == stage]
            for when, m in (("before", logged[0]), ("after", logged[-1])):
                records += [{"run": r.label, "student": r.arch, "variant": r.variant, "stage": stage, "when": when,
                             "step": m["step"], "layer": i, "loss": v} for i, v in enumerate(m["layer_losses"])]
    return pd.DataFrame(records, columns=["run", "student", "variant", "stage", "when", "step", "layer", "loss"])


def plot_training_curves(runs: list[StudyRun], path: str | os.PathLike) -> Path | None:
    """Loss against tokens seen, one panel per stage, one line per run (log y when the losses span
    more than a decade); PNG at ``path``.
    None when no run logged a step."""
    from .stages import STAGE_NAMES
    from .viz import plot_training_curves as draw, save_png

    fig = draw(steps_frame(runs), STAGE_NAMES)
    return None if fig is None else save_png(fig, path)


def plot_validation(runs: list[StudyRun], path: str | os.PathLike) -> Path | None:
    """Validation perplexity and KL after conversion and each stage, one line per run."""
    from .viz import plot_validation as draw, save_png

    records = [{"run": r.label, "variant": r.variant, "after": a, "perplexity": r.evals[a].get("perplexity"),
                "KL": r.evals[a].get("kl")} for r in runs for a in STAGE_EVALS if a in r.evals]
    teacher_ppl = [r.evals[a]["teacher_perplexity"] for r in runs for a in r.evals if "teacher_perplexity" in r.evals[a]]
    fig = draw(records, STAGE_EVALS, teacher_ppl[0] if teacher_ppl else None)
    return None if fig is None else save_png(fig, path)


def bench_figures(outputs: str | os.PathLike, figures_dir: str | os.PathLike) -> list[Path]:
    """Speed and memory against context (seaborn, log-2 x) from ``outputs/bench/bench.csv``,
    drawn by ``linearize.bench.plot``; [] when there is no benchmark yet."""
    from . import bench

    csv = Path(outputs) / "bench" / "bench.csv"
    if not csv.exists():
        return []
    rows = [r for r in bench.read_csv(csv) if not r.get("error")]
    if not rows:
        return []
    return bench.plot(rows, figures_dir)


def bench_table(outputs: str | os.PathLike):
    """The benchmark rows (model, context, speeds, memory) as a frame; None without a CSV."""
    import pandas as pd

    from . import bench

    csv = Path(outputs) / "bench" / "bench.csv"
    if not csv.exists():
        return None
    cols = {"model": None, "context": None, "prefill_tok_s": "{:.1f}", "decode_tok_s": "{:.1f}",
            "roofline_tok_s": "{:.1f}", "peak_rss_mib": "{:.0f}", "state_mib": "{:.3g}", "dtype": None, "error": None}
    df = pd.DataFrame(bench.read_csv(csv))
    if "error" in df and not df["error"].fillna("").astype(str).str.strip().any():
        df = df.drop(columns="error")  # no failed point: no empty column
    df = df[[c for c in cols if c in df.columns]].copy()
    for col, fmt in cols.items():  # rounded for reading; bench.csv keeps the full numbers
        if fmt and col in df:
            df[col] = df[col].map(lambda v: MISSING if v is None or v == "" or v != v else fmt.format(float(v)))
    return df.set_index(["model", "context"])


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# Attention explorer over the saved students
# ---------------------------------------------------------------------------------------
class RunStudents(Mapping):
    """{run label: student} that loads a student from its run folder when first asked for
    (``evaluate.load_model``) and keeps only the ``keep`` most recent in memory: 60 students
    of a full grid would not fit at once, and the explorer caches the maps it has drawn."""

    def __init__(self, runs: list[StudyRun], keep: int = 2):
        self.dirs = {r.label: r.dir for r in runs}
        self.keep = max(1, keep)
        self._loaded: OrderedDict = OrderedDict()

    def __getitem__(self, label):
        if label not in self.dirs:
            raise KeyError(f"no run {label!r}; runs: {list(self.dirs)}")
        if label not in self._loaded:
            from .evaluate import load_model

            model, _, _ = load_model(self.dirs[label])
            self._loaded[label] = model
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(label)
        return self._loaded[label]

    def __iter__(self):
        return iter(self.dirs)

    def __len__(self):
        return len(self.dirs)


def build_explorer(runs: list[StudyRun], texts: list[str], max_tokens: int = 48, keep: int = 2,
                   outputs: str | os.PathLike | None = None):
    """``explorer.AttentionExplorer`` over the teacher and the saved students of ``runs`` (those
    distilled from the most common teacher). Students load lazily (``RunStudents``)."""
    from .teacher import load_teacher
    from .explorer import AttentionExplorer

    name = teacher_name(runs, outputs)
    chosen = [r for r in runs if str(r.params.get("teacher")) == name]
    if not chosen:
        raise StudyError("the explorer needs at least one student run (outputs/<arch>/<run>/params.yaml).")
    teacher, tok = load_teacher(name)
    explorer = AttentionExplorer(teacher, tok, {r.label: None for r in chosen}, list(texts), max_tokens=max_tokens)
    # AttentionExplorer copies its students into a dict; hand it the lazy mapping afterwards so
    # that students are loaded only when the widget shows them.
    explorer.students = RunStudents(chosen, keep=keep)
    return explorer


def save_explorer_view(explorer, figures_dir: str | os.PathLike, student: str | None = None, layer: int = 0,
                       head: int = 0, example: int = 0) -> list[Path]:
    """The explorer's static view (by default the widget's first view: first student, layer 0,
    head 0, example 0) as two PNGs: maps side by side and distance per layer."""
    from .viz import save_png

    student = student or next(iter(explorer.students))
    maps, distances = explorer.figure(student, layer, head, example)
    figures_dir = Path(figures_dir)
    return [save_png(maps, figures_dir / "explorer_maps.png"), save_png(distances, figures_dir / "explorer_distance.png"),
            save_png(explorer.grid_figure(student, example=example), figures_dir / "explorer_grid.png")]


# ---------------------------------------------------------------------------------------
# Results page and HTML export
# ---------------------------------------------------------------------------------------
def _link(page: Path, target: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), page.resolve().parent)).as_posix()


def export_html(executed_ipynb: str | os.PathLike, html_path: str | os.PathLike | None = None) -> Path:
    """The executed notebook as a standalone HTML page (nbconvert; images embedded, no code
    input hidden) that reads without a kernel; beside the notebook by default."""
    executed_ipynb = Path(executed_ipynb)
    if not executed_ipynb.exists():
        raise StudyError(f"{executed_ipynb} does not exist: execute the notebook first (papermill).")
    import nbformat
    from nbconvert import HTMLExporter

    html_path = Path(html_path) if html_path else executed_ipynb.with_suffix(".html")
    nb = nbformat.read(executed_ipynb, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")
    return html_path
