"""The study runner behind `make study`: the stage notebooks under papermill, in order.

Each step is a notebook executed into ``outputs/``; a step whose executed notebook and
``.done`` marker both exist is skipped, so running the command again resumes after the last
finished step, and a step whose output is missing is redone. Parameters flow one way:
command line -> notebook parameters cell -> lib -> outputs/.
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
    def marker(self) -> Path:
        return self.output.with_suffix(".done")

    def finished(self) -> bool:
        return self.output.exists() and self.marker.exists()


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
    )
    seconds = time.perf_counter() - start
    step.marker.write_text(json.dumps({"seconds": seconds, "parameters": step.parameters}))
    return f"done in {seconds:.0f} s"


def plan(students: list[str], preset: str, teacher: str | None = None) -> list[Step]:
    """The ordered steps of a study (the notebooks that exist so far)."""
    common = {"teacher": teacher} if teacher else {}
    steps = [Step("00_teacher.ipynb", OUTPUTS / "teacher" / "00_teacher.ipynb", dict(common))]
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearize.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="gla", help="comma-separated student names (default: gla)")
    parser.add_argument("--preset", default="cpu-quick", help="params preset (cpu-quick, cpu-study, paper)")
    parser.add_argument("--teacher", default=None, help="teacher name, hub id or folder (default: embedded)")
    parser.add_argument("--force", action="store_true", help="redo finished steps")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    total = time.perf_counter()
    for step in plan(students, args.preset, args.teacher):
        print(f"[{step.notebook} -> {step.output.relative_to(ROOT) if step.output.is_relative_to(ROOT) else step.output}]",
              flush=True)
        print(f"  {run_step(step, args.force)}", flush=True)
    print(f"study finished in {time.perf_counter() - total:.0f} s; results under {OUTPUTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
