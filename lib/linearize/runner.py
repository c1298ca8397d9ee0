"""The study runner behind `make study`: the stage notebooks under papermill, in order.

Each step is a notebook executed into ``outputs/``; a step whose executed notebook and
``.done`` marker both exist, and whose marker records the same parameters, is skipped, so
running the command again resumes after the last finished step, and a step whose output is
missing or whose parameters changed (another eval limit, another benchmark model list) is
redone. The study notebook (05) reads everything before it, so it is redone whenever a step
before it ran. Parameters flow one way: command line -> notebook parameters cell -> lib ->
outputs/. The study page and its figures are written to ``outputs/study/``; ``--publish``
(``make publish``) copies them into ``docs/``, so a user's run never changes the repository.
Every step's line says which step of how many it is, the time elapsed and an estimate of what
is left (from the durations its finished steps recorded); the notebooks' own output, progress
bars included, streams into the log.

Why ~420 lines in one module: the plan (variants, grids, steps), the resumable execution and the
command line are one small program whose parts change together; the variants list here is the
one the results read (``linearize.study.variant_of`` names a hand-made run by the same parts).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .paths import OUTPUTS, ROOT

NOTEBOOKS = ROOT / "notebooks"


@dataclass
class Step:
    notebook: str  # file name in notebooks/
    output: Path  # executed notebook
    parameters: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """What the step's duration predicts: its notebook, and whether it works on the teacher
        (the teacher's evaluation is neither a student's nor a typical step: 77 minutes in the grid
        against about 20 for a student)."""
        return self.notebook + (" (teacher)" if self.output.parent.name == "teacher" else "")

    @property
    def marker(self) -> Path:
        return self.output.with_suffix(".done")

    def finished(self) -> bool:
        """Executed (or restored from committed records, see ``restore``), marked done, and with
        the parameters asked for now."""
        if not self.marker.exists():
            return False
        try:
            marker = json.loads(self.marker.read_text())
            stored = marker.get("parameters")
        except (json.JSONDecodeError, AttributeError):
            return False  # a damaged marker: redo the step rather than trust it
        if not (self.output.exists() or marker.get("restored_from")):
            return False
        return _portable(stored) == _portable(self.parameters)


def _portable_under(value, outputs: Path):
    """``_portable`` against this checkout and against the one that owns ``outputs`` (a grid run
    from another worktree names its own paths), so both compare equal wherever they were made."""
    return _portable(_portable(value, Path(outputs).resolve().parent))


def _portable(value, root: Path | None = None):
    """Parameters as JSON with paths inside the repository (``root``, default this checkout)
    made relative, so a moved or cloned checkout still recognises its finished steps."""
    value = json.loads(json.dumps(value, default=str))
    root = str(root or ROOT) + os.sep

    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v[len(root):] if isinstance(v, str) and v.startswith(root) else v

    return fix(value)


# Per-cell time limits, for notebooks whose cells have a known small cost: the study notebook
# only reads outputs/ (seconds per cell), and one run of it once hung with its kernel idle.
# Training, evaluation and benchmark cells scale with the preset, so they get no limit.
CELL_TIMEOUT_S = {"05_study.ipynb": 900}


def run_step(step: Step, force: bool = False) -> str:
    if step.finished() and not force:
        return "skipped"
    import papermill as pm

    step.output.parent.mkdir(parents=True, exist_ok=True)
    step.marker.unlink(missing_ok=True)
    start = time.perf_counter()
    pm.execute_notebook(
        str(NOTEBOOKS / step.notebook), str(step.output), parameters=step.parameters,
        cwd=str(ROOT), progress_bar=False, log_output=False,
        execution_timeout=CELL_TIMEOUT_S.get(step.notebook),
        # the cells' own output (training and evaluation progress bars, prints) goes to the
        # runner's log as it comes, so a long cell is not minutes of silence
        stdout_file=sys.stdout, stderr_file=sys.stderr,
    )
    if step.notebook == "05_study.ipynb":  # the study as a page that reads without a kernel
        from .study import export_html
        export_html(step.output, step.output.with_suffix(".html"))
    seconds = time.perf_counter() - start
    step.marker.write_text(json.dumps({"seconds": seconds, "parameters": step.parameters}))
    return f"done in {seconds:.0f} s"


def recorded_seconds(step: Step) -> float | None:
    """How long a finished step took, from its marker (None when unknown)."""
    try:
        seconds = json.loads(step.marker.read_text()).get("seconds")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) else None


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def estimate_left(remaining: list[Step], durations: dict[str, list[float]]) -> tuple[float, int] | None:
    """Seconds the ``remaining`` steps will take: each step the median duration of the finished
    steps of the same kind (``Step.kind``: notebook, teacher or student; this session's and
    earlier ones', from their markers), else the median of all finished steps. Returns (seconds, how many durations it rests on), or None
    before any step has finished."""
    import statistics

    every = [x for xs in durations.values() for x in xs]
    if not every:
        return None
    overall = statistics.median(every)
    total = sum(statistics.median(durations[s.kind]) if durations.get(s.kind) else overall
                for s in remaining)
    return total, len(every)


def progress_line(index: int, steps: list[Step], elapsed: float, left: tuple[float, int] | None) -> str:
    step = steps[index]
    where = step.output.relative_to(ROOT) if step.output.is_relative_to(ROOT) else step.output
    eta = (f"about {clock(left[0])} left (from {left[1]} finished step{'s' if left[1] != 1 else ''})"
           if left else "no estimate yet")
    return f"[step {index + 1}/{len(steps)}: {step.notebook} -> {where}] elapsed {clock(elapsed)}, {eta}"


# What `--publish` copies from a finished study into docs/ (issue 19: `make study` itself writes
# only under outputs/, so a user's run never dirties the repository).
def publish(outputs: Path = OUTPUTS, docs: Path = ROOT / "docs") -> list[Path]:
    """Copy the study's page (results.md), its JSON twin (results.json, validated against the
    schema) and its figures from ``outputs/study/`` into ``docs/``. Returns the files written."""
    import shutil

    from .results import read_results

    study = Path(outputs) / "study"
    page, twin = study / "results.md", study / "results.json"
    missing = [p for p in (page, twin) if not p.exists()]
    if missing:
        raise SystemExit(f"nothing to publish: {', '.join(map(str, missing))} missing; run `make study` "
                         "(python -m linearize.runner) to the end first.")
    read_results(twin)  # a page whose twin does not follow the schema is not published
    docs = Path(docs)
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    written = []
    for src, dst in ((page, docs / "results.md"), (twin, docs / "results.json")):
        shutil.copyfile(src, dst)
        written.append(dst)
    for png in sorted((study / "figures").glob("*.png")):
        shutil.copyfile(png, docs / "figures" / png.name)
        written.append(docs / "figures" / png.name)
    return written


# What `--snapshot` keeps of a study (a few hundred KB per run): everything the results page
# reads (params, metrics, stage records, zero-shot results with per-document scores) and the
# runner's step markers, none of the weights. A long grid's finished cells are committed from
# here as they come, so they outlive the machine; notebook 05 can read the folder as `outputs`.
SNAPSHOT_FILES = ("params.yaml", "metrics.jsonl", "teacher.json", "eval_limit*.json", "eval_full*.json",
                  "*.done", "stage[0-9]/done.json", "stage[0-9]/params.yaml")


def snapshot(preset: str, outputs: Path = OUTPUTS, dest: Path | None = None) -> list[Path]:
    """Copy the records of the teacher and of every run of ``preset`` under ``outputs`` into
    ``dest`` (default ``results/<preset>/``), same layout. Returns the files written."""
    import shutil

    outputs = Path(outputs)
    dest = Path(dest) if dest is not None else ROOT / "results" / preset
    folders = [outputs / "teacher", *sorted(p.parent for p in outputs.glob(f"*/{preset}-*/params.yaml"))]
    written = []
    for folder in folders:
        for pattern in SNAPSHOT_FILES:
            for src in sorted(folder.glob(pattern)):
                dst = dest / src.relative_to(outputs)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.suffix == ".done":  # a marker's parameters name paths: keep them machine-free
                    marker = json.loads(src.read_text())
                    if marker.get("restored_from") and dst.exists():
                        continue  # brought back from this very record by --restore: keep the original
                    marker["parameters"] = _portable_under(marker.get("parameters"), outputs)
                    dst.write_text(json.dumps(marker))
                else:
                    shutil.copyfile(src, dst)
                written.append(dst)
    return written


def restore(steps: list[Step], source: Path, outputs: Path = OUTPUTS) -> list[Path]:
    """Bring the committed records of finished work (``snapshot``'s layout under ``source``,
    e.g. ``results/cpu-grid``) back into ``outputs``, so that a grid resumed on a new machine,
    whose outputs/ is empty, skips the cells it already finished instead of training them again.

    Only whole run folders come back: a folder (the teacher's, or one student cell's) is restored
    when every step the plan has in it is recorded there as finished with the parameters asked
    for now, and outputs/ has nothing in that folder yet (a folder with work in it is left as it
    is, never mixed). The records carry no weights, so a restored cell is finished, not
    continuable; its markers say ``restored_from``, which ``Step.finished`` accepts in place of
    the executed notebook. Returns the run folders restored."""
    import shutil

    source, outputs = Path(source), Path(outputs)
    folders: dict[Path, list[Step]] = {}
    for step in steps:
        if step.output.is_relative_to(outputs) and step.notebook not in ("04_benchmark.ipynb", "05_study.ipynb"):
            folders.setdefault(step.output.parent, []).append(step)
    restored = []
    for folder, folder_steps in folders.items():
        committed = source / folder.relative_to(outputs)
        if not committed.is_dir() or (folder.exists() and any(folder.iterdir())):
            continue
        markers = []
        for step in folder_steps:
            try:
                marker = json.loads((committed / step.marker.name).read_text())
            except (OSError, json.JSONDecodeError):
                break
            if (not isinstance(marker, dict)
                    or _portable_under(marker.get("parameters"), outputs) != _portable_under(step.parameters, outputs)):
                break
            markers.append((step, marker))
        else:
            shutil.copytree(committed, folder, dirs_exist_ok=True)
            where = str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source)
            for step, marker in markers:
                step.marker.write_text(json.dumps({**marker, "parameters": step.parameters, "restored_from": where}))
            restored.append(folder)
    return restored


# Tokens of the closed-form readout fit in the "-fit" variants: 64 blocks of 128 = 8192 tokens,
# 14x the 576 features each layer's o_proj reads (see benchmarks/conversion_gap.py).
READOUT_FIT_TOKENS = 8192
# Stage 2 (H2H) after a fit starts near the teacher, and the presets' rate (1e-3) undoes the fit:
# at cpu-quick, validation perplexity after stage 2 went 169 -> 605 (DeltaNet) and 188 -> 1664
# (xLSTM) at 1e-3, and 169 -> 162 for DeltaNet at 1e-4 (3e-5: 162).
FIT_STAGE2_LR = 1e-4
# Stage 3 after attention transfer: 3e-4 diverged on the mixed corpus (KL 1.58 -> 3.39 in 24
# steps, outputs/diverged/), 1e-4 did not (docs/recipe.md).
RECIPE_STAGE3_LR = 1e-4
# Teacher tokens the gate initialisation measures attention distances on (64 blocks of 128), as
# in docs/gate_init.md and the recipe page's mix-at-gi runs.
GATE_INIT_TOKENS = 8192
_RECIPE = dict(qkv_copy=True, matrix_mixing=False, h2h=False)
_RECIPE_OVERRIDES = {"readout_fit_tokens": READOUT_FIT_TOKENS, "attention_transfer": True,
                     "stage3_lr": RECIPE_STAGE3_LR}

# Training variants of one student (the paper's Table 2 and Table 3 grid). Stage 3 (end-to-end
# distillation) always runs; the name says what comes before it.
VARIANTS: dict[str, dict] = {
    "kd": dict(qkv_copy=False, matrix_mixing=False, h2h=False),  # Table 2, without MM
    "mm": dict(qkv_copy=False, matrix_mixing=True, h2h=False),  # Table 2, with MM
    "mm-h2h": dict(qkv_copy=False, matrix_mixing=True, h2h=True),  # Table 3: GLA collapsed here
    "qkv": dict(qkv_copy=True, matrix_mixing=False, h2h=False),  # Table 3
    "qkv-mm": dict(qkv_copy=True, matrix_mixing=True, h2h=False),  # Table 3
    "qkv-mm-h2h": dict(qkv_copy=True, matrix_mixing=True, h2h=True),  # Table 3: the paper's best
    # beyond the paper: the closed-form o_proj fit right after conversion (linearize.calibrate)
    "qkv-fit": dict(qkv_copy=True, matrix_mixing=False, h2h=False, overrides={"readout_fit_tokens": READOUT_FIT_TOKENS}),
    "qkv-fit-mm-h2h": dict(qkv_copy=True, matrix_mixing=True, h2h=True,
                           overrides={"readout_fit_tokens": READOUT_FIT_TOKENS, "stage2_lr": FIT_STAGE2_LR}),
    # beyond the paper: the token-efficient recipe (docs/recipe.md): readout fit, then stage 0,
    # attention-output transfer, in place of matrix mixing and hidden-to-hidden
    # (distillation after it at 1e-4: at 3e-4 it diverged on the mixed corpus, docs/recipe.md)
    "qkv-fit-at": dict(_RECIPE, overrides=dict(_RECIPE_OVERRIDES)),
    # the recipe with each head's decay gate set from the teacher's attention distances first
    # (linearize.gate_init), for the students that have such gates (gate_init.GATED): gla's
    # recipe cell went from 4.80x / KL 2.00 to 2.79x / KL 1.44 at the same 80K tokens, and +1.3
    # points on the six tasks paired on the same 3000 documents (+0.2 to +2.4); xlstm's KL went
    # 1.21 -> 1.15 and its six tasks did not move (+0.1, -0.8 to +1.1) (docs/recipe.md, mix-gi-kd
    # against the grid's cells)
    "qkv-fit-at-gi": dict(_RECIPE, overrides=dict(_RECIPE_OVERRIDES, gate_init_tokens=GATE_INIT_TOKENS)),
}
GATED_ONLY = {"qkv-fit-at-gi"}  # variants that only mean something for a gated student
GRIDS = {
    # `make study`'s default: the project's recipe, which took DeltaNet to 1.3-1.9x the teacher's
    # perplexity where the paper's pipeline at similar tokens left it at 21x (docs/recipe.md),
    # with the gate initialisation for a gated student and without it for the others (one
    # variant per student, see variants_for); the paper's best recipe is one flag away (--grid paper)
    "default": ["qkv-fit-at-gi", "qkv-fit-at"],
    "paper": ["qkv-mm-h2h"],
    "table2": ["kd", "mm"],
    "table3": ["qkv", "qkv-mm", "qkv-mm-h2h", "mm-h2h"],
    "fit": ["qkv-mm-h2h", "qkv-fit", "qkv-fit-mm-h2h"],
    "recipe": ["qkv-fit-at", "qkv-mm-h2h"],  # the new recipe beside the paper's best
    "all": list(VARIANTS),
}
# The study of issue 15: the project's recipe (attention transfer) and the paper's Table 2 (kd,
# mm) for every student, and Table 3's ablations for the two students the paper ablates (gla,
# xlstm). The recipe comes first: the study runs variant by variant (see plan), so after each
# part of a long grid one whole column, every student under one variant, is finished.
TABLE3_STUDENTS = ("gla", "xlstm")
# The gate-initialised recipe comes last (beyond the paper, five gated students): the paper's
# columns are the study's core, and the recipe column without it already holds every student.
GRIDS["study"] = list(dict.fromkeys(["qkv-fit-at"] + GRIDS["table2"] + GRIDS["table3"] + ["qkv-fit-at-gi"]))


def variants_for(arch: str, grid: str) -> list[str]:
    """The training variants of one student in a grid. A gated-only variant (``GATED_ONLY``)
    goes to the students with decay gates (``gate_init.GATED``) alone; in "default" each student
    gets one recipe, the gated one where it applies; in "study" only TABLE3_STUDENTS get the
    Table 3 ablations."""
    from .gate_init import GATED

    gated = arch in GATED
    variants = [v for v in GRIDS[grid] if gated or v not in GATED_ONLY]
    if grid == "default":
        variants = variants[:1]
    if grid == "study" and arch not in TABLE3_STUDENTS:
        variants = [v for v in variants if v not in GRIDS["table3"]]
    return variants


DEFAULT_STUDENTS = ["gla", "xlstm", "deltanet"]  # one per kernel family
# Zero-shot evaluation size per preset: the full tasks take about 10 minutes per model at
# limit 500 on 2 cores, so the quick preset evaluates a sample.
EVAL_LIMIT = {"cpu-quick": 100, "cpu-study": 500, "cpu-grid": 500, "paper": None}


def run_dir(arch: str, preset: str, variant: str) -> Path:
    return OUTPUTS / arch / f"{preset}-{variant}"


def plan(students: list[str], preset: str, teacher: str | None = None, grid: str = "default",
         bench_lengths: str = "128,512,2048,8192", eval_limit: int | None | str = "preset",
         hybrid_windows: tuple[int, ...] = (0,)) -> list[Step]:
    """The ordered steps of a study: teacher, then per student and variant align -> distill ->
    evaluate, then the benchmark and the study notebook (which reads outputs/ only).

    ``hybrid_windows``: 0 is the plain student; each w > 0 adds the student with a w-token
    softmax window beside it (beyond the paper), in ``<preset>-<variant>-w<w>`` and benchmarked
    as ``<student>+w<w>`` (not for the softmax student, which is exact attention already)."""
    from .mixers import available

    unknown = [s for s in students if s not in available() and s != "llama"]
    if unknown:
        raise SystemExit(f"unknown student(s) {unknown}; choose from {available()}")
    if grid not in GRIDS:
        raise SystemExit(f"unknown grid {grid!r}; choose from {sorted(GRIDS)}")
    limit = EVAL_LIMIT.get(preset, 100) if eval_limit == "preset" else eval_limit
    common = {"teacher": teacher} if teacher else {}
    teacher_dir = OUTPUTS / "teacher"
    steps = [
        Step("00_teacher.ipynb", teacher_dir / "00_teacher.ipynb", dict(common, output_dir=str(teacher_dir))),
        Step("03_evaluate.ipynb", teacher_dir / "03_evaluate.ipynb",
             dict(common, run_dir=None, limit=limit, output_dir=str(teacher_dir))),
    ]
    if any(w < 0 for w in hybrid_windows) or not hybrid_windows:
        raise SystemExit(f"hybrid windows must be >= 0 (0: the plain student), got {list(hybrid_windows)}")
    # variant by variant, every student under one variant before the next: a grid done in parts
    # finishes whole columns (one variant, all students) first
    order = list(dict.fromkeys(v for arch in students for v in variants_for(arch, grid)))
    cells = [(arch, v) for v in order for arch in students if v in variants_for(arch, grid)]
    for arch, variant in cells:
        for window in hybrid_windows:  # beyond the paper when window > 0: the hybrid student
            if window and arch in ("softmax", "llama"):
                continue  # exact attention already: the window is for the subquadratic students
            folder = run_dir(arch, preset, variant + (f"-w{window}" if window else ""))
            train = dict(common, arch=arch, preset=preset, run_name=folder.name, **VARIANTS[variant])
            if window:
                train["overrides"] = {**train.get("overrides", {}), "hybrid_window": window}
            steps += [
                Step("01_align.ipynb", folder / "01_align.ipynb", train),
                Step("02_distill.ipynb", folder / "02_distill.ipynb",
                     {k: v for k, v in train.items() if k not in ("matrix_mixing", "h2h")}),
                Step("03_evaluate.ipynb", folder / "03_evaluate.ipynb",
                     # the teacher's row comes from the teacher step above, evaluated once
                     dict(run_dir=str(folder), limit=limit, compare_teacher=False)),
            ]
    bench = OUTPUTS / "bench"
    hybrids = [f"{s}+w{w}" for s in students for w in hybrid_windows if w and s not in ("softmax", "llama")]
    steps.append(Step("04_benchmark.ipynb", bench / "04_benchmark.ipynb",
                      dict(common, models=",".join(["teacher", *students, *hybrids]), lengths=bench_lengths,
                           out=str(bench / "bench.csv"))))
    study = OUTPUTS / "study"  # the page stays in outputs/: `--publish` copies it into docs/
    steps.append(Step("05_study.ipynb", study / "05_study.ipynb",
                      dict(outputs=str(OUTPUTS), figures_dir=str(study / "figures"),
                           results_page=str(study / "results.md"), presets=preset, grid=grid)))
    return [s for s in steps if (NOTEBOOKS / s.notebook).exists()]


def _eval_limit(value: str):
    """--eval-limit: a positive int, 'none' (all documents) or 'preset' (argparse type)."""
    if value in ("preset", "none"):
        return None if value == "none" else value
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, 'none' or 'preset', got {value!r}") from None
    if limit < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, 'none' or 'preset', got {value!r}")
    return limit


def _lengths(value: str) -> str:
    try:
        ok = all(int(x) > 0 for x in value.split(",") if x.strip()) and value.strip()
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive context lengths, got {value!r}")
    return value


def validate_plan(steps: list[Step]) -> None:
    """Everything the steps will need that can be checked without running them: the training
    parameters of every run (preset, student, variant overrides) resolve, and the teacher name
    is one the loader accepts. Raises SystemExit with the problem before the first step."""
    from .params import ParamsError, resolve
    from .teacher import TeacherError, resolve_teacher

    for step in steps:
        p = step.parameters
        try:
            if "teacher" in p:
                resolve_teacher(p["teacher"])
            if step.notebook in ("01_align.ipynb", "02_distill.ipynb"):
                # as the notebooks do: their own values over `overrides`
                values = {k: v for k, v in p.items() if k not in ("arch", "preset", "overrides")}
                resolve(p["arch"], p["preset"], {**p.get("overrides", {}), **values})
        except (ParamsError, TeacherError) as err:
            raise SystemExit(f"{step.notebook} for {step.output.parent.name} would fail: {err}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearize.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--students", default=",".join(DEFAULT_STUDENTS),
                        help=f"comma-separated student names (default: {','.join(DEFAULT_STUDENTS)}); 'all' for the ten")
    parser.add_argument("--grid", default="default", help=f"training variants per student: {', '.join(GRIDS)}")
    parser.add_argument("--bench-lengths", default="128,512,2048,8192", type=_lengths,
                        help="context lengths for the benchmark")
    parser.add_argument("--eval-limit", default="preset", type=_eval_limit,
                        help="documents per task (an int, 'none' for all, or 'preset')")
    parser.add_argument("--hybrid", default="0",
                        help="softmax-window sizes per student, comma-separated: 0 = the plain student, w > 0 = "
                             "the hybrid with a w-token window (beyond the paper); e.g. 0,64 runs both")
    parser.add_argument("--preset", default="cpu-quick", help="params preset (cpu-quick, cpu-study, paper)")
    parser.add_argument("--teacher", default=None, help="teacher name, hub id or folder (default: embedded)")
    parser.add_argument("--force", action="store_true", help="redo finished steps")
    parser.add_argument("--publish", action="store_true",
                        help="run nothing: copy the finished study's page, results.json and figures from "
                             "outputs/study/ into docs/ (for maintainers; `make publish`)")
    parser.add_argument("--snapshot", action="store_true",
                        help="run nothing: copy the records of the teacher and of every run of --preset (no "
                             "weights) into results/<preset>/, to commit a long grid's finished cells")
    parser.add_argument("--restore", default=None, metavar="DIR",
                        help="before running, bring back from DIR (a --snapshot folder, e.g. results/cpu-grid) "
                             "the records of every teacher or student folder whose steps are all finished "
                             "there, so a grid resumed on a new machine skips them (records only, no weights)")
    parser.add_argument("--no-bench", action="store_true",
                        help="leave out the benchmark step (04): speed and memory depend on the students, "
                             "not on the training variant, so a new grid need not re-measure them")
    args = parser.parse_args(argv)
    if args.snapshot:
        written = snapshot(args.preset)
        print(f"{len(written)} files of preset {args.preset} copied into {ROOT / 'results' / args.preset}")
        return 0
    if args.publish:
        for path in publish():
            print(f"published {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # progress bars in the kernels redraw at most every 30 s: enough to follow, not a flood in the log
    os.environ.setdefault("TQDM_MININTERVAL", "30")
    from .memory import MALLOC_ENV

    for key, value in MALLOC_ENV.items():  # inherited by the notebook kernels papermill starts
        os.environ.setdefault(key, value)
    if args.students == "all":
        from .mixers import available

        students = available()
    else:
        students = [s.strip() for s in args.students.split(",") if s.strip()]
    from .params import presets

    if args.preset not in presets():
        parser.error(f"unknown preset {args.preset!r}; valid presets: {', '.join(presets())}")
    total = time.perf_counter()
    try:
        windows = tuple(int(w) for w in args.hybrid.split(",") if w.strip())
    except ValueError:
        raise SystemExit(f"--hybrid takes comma-separated window sizes like 0,64, got {args.hybrid!r}") from None
    steps = plan(students, args.preset, args.teacher, args.grid, args.bench_lengths, args.eval_limit, windows)
    if args.no_bench:
        steps = [s for s in steps if s.notebook != "04_benchmark.ipynb"]
    validate_plan(steps)
    source = None
    if args.restore:
        source = Path(args.restore) if Path(args.restore).is_absolute() else ROOT / args.restore
        if not source.is_dir():
            raise SystemExit(f"--restore {args.restore}: no such folder (make it with --snapshot)")
    # one study per outputs/ at a time: a second one would train the same runs twice and time
    # the benchmark while the other trains
    from .runfiles import RunLockedError, hold_lock

    try:
        with hold_lock(OUTPUTS, f"outputs folder {OUTPUTS} (a study)", name=".study.lock"):
            if source is not None:
                back = restore(steps, source)
                print(f"restored {len(back)} finished folder(s) from {args.restore} (records, no weights): "
                      + (", ".join(str(f.relative_to(OUTPUTS)) for f in back) or "none"), flush=True)
            return _run_steps(steps, args, total)
    except RunLockedError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1


def _run_steps(steps: list[Step], args, total: float) -> int:
    ran = False
    durations: dict[str, list[float]] = {}
    for step in steps:
        if step.finished() and (seconds := recorded_seconds(step)) is not None:
            durations.setdefault(step.kind, []).append(seconds)
    for index, step in enumerate(steps):
        remaining = [s for s in steps[index:] if args.force or not s.finished()
                     or (ran and s.notebook == "05_study.ipynb")]
        print(progress_line(index, steps, time.perf_counter() - total, estimate_left(remaining, durations)),
              flush=True)
        # the study notebook summarises all outputs: stale as soon as anything before it ran
        try:
            outcome = run_step(step, args.force or (ran and step.notebook == "05_study.ipynb"))
        except Exception as err:  # papermill's errors carry the failing cell's traceback
            print(f"  FAILED: {type(err).__name__}: {str(err).strip()[-2000:]}\n"
                  f"The executed notebook with the error is {step.output}. Finished steps are kept: "
                  "run the same command again to go on from this step.", file=sys.stderr, flush=True)
            return 1
        ran = ran or outcome != "skipped"
        if outcome != "skipped" and (seconds := recorded_seconds(step)) is not None:
            durations.setdefault(step.kind, []).append(seconds)
        print(f"  {outcome}", flush=True)
    print(f"study finished in {time.perf_counter() - total:.0f} s; results under {OUTPUTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
