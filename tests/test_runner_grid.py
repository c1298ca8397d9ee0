"""The study grid through the runner: a second run skips every finished step, progress lines
with an estimate of what is left, and publishing into docs/ as a separate command.

papermill is replaced by a fake that writes the executed notebook and counts calls, so the
runner's own logic (plan, markers, parameters, skip) runs on the real plan of the full grid
without starting ~100 kernels; tests/test_runner.py runs real notebooks."""
import json
import re

import pytest

from linearize import runner
from linearize.mixers import available


@pytest.fixture
def fake_papermill(tmp_path, monkeypatch):
    import papermill

    import linearize.study

    calls = []

    def execute(src, out, parameters=None, **kwargs):
        calls.append((src, out, parameters))
        with open(out, "w") as fh:
            fh.write("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(linearize.study, "export_html", lambda src, dst: dst)
    monkeypatch.setattr(runner, "OUTPUTS", tmp_path / "outputs")
    return calls


ARGS = ["--students", "all", "--grid", "study", "--preset", "cpu-grid"]


def test_second_run_of_the_study_grid_skips_every_step(fake_papermill, capsys):
    steps = runner.plan(available(), "cpu-grid", grid="study")
    assert runner.main(ARGS) == 0
    assert len(fake_papermill) == len(steps)
    first = capsys.readouterr().out
    assert f"[step 1/{len(steps)}: 00_teacher.ipynb" in first
    assert f"[step {len(steps)}/{len(steps)}: 05_study.ipynb" in first
    fake_papermill.clear()
    assert runner.main(ARGS) == 0
    second = capsys.readouterr().out
    assert fake_papermill == []  # nothing executed again
    assert second.count("  skipped") == len(steps)
    # another evaluation size redoes the evaluations and the study page, nothing else
    assert runner.main([*ARGS, "--eval-limit", "600"]) == 0
    redone = {runner.Path(src).name for src, _, _ in fake_papermill}
    assert redone == {"03_evaluate.ipynb", "05_study.ipynb"}
    assert sum(1 for s in steps if s.notebook == "03_evaluate.ipynb") + 1 == len(fake_papermill)


def test_study_grid_gives_table3_ablations_to_gla_and_xlstm_only():
    steps = runner.plan(available(), "cpu-grid", grid="study")
    runs = {(s.output.parent.parent.name, s.output.parent.name) for s in steps if s.notebook == "02_distill.ipynb"}
    assert len(available()) == 10
    for arch in available():
        mine = {name.removeprefix("cpu-grid-") for a, name in runs if a == arch}
        expected = {"qkv-fit-at", "kd", "mm"} | (
            {"qkv", "qkv-mm", "qkv-mm-h2h", "mm-h2h"} if arch in ("gla", "xlstm") else set()) | (
            {"qkv-fit-at-gi"} if arch in ("gla", "metala", "hgrn2", "xlstm", "mamba2") else set())
        assert mine == expected, arch
    evals = [s for s in steps if s.notebook == "03_evaluate.ipynb"]
    assert all(s.parameters["limit"] >= 500 for s in evals)  # the study preset separates students
    # variant by variant: every student's recipe cell comes before any paper cell, so a grid run
    # in parts finishes whole columns first
    order = [s.output.parent.name.removeprefix("cpu-grid-") for s in steps if s.notebook == "02_distill.ipynb"]
    assert order[:10] == ["qkv-fit-at"] * 10 and order[10:20] == ["kd"] * 10
    assert order[-5:] == ["qkv-fit-at-gi"] * 5  # beyond the paper, after the paper's columns


def test_default_grid_gives_each_student_one_recipe_gate_init_where_it_has_gates():
    steps = runner.plan(["gla", "deltanet", "xlstm", "rebased"], "cpu-quick")
    runs = [(s.output.parent.parent.name, s.output.parent.name.removeprefix("cpu-quick-"))
            for s in steps if s.notebook == "02_distill.ipynb"]
    assert sorted(runs) == [("deltanet", "qkv-fit-at"), ("gla", "qkv-fit-at-gi"),
                            ("rebased", "qkv-fit-at"), ("xlstm", "qkv-fit-at-gi")]
    gi = next(s for s in steps if s.notebook == "01_align.ipynb" and s.output.parent.name.endswith("-gi"))
    assert gi.parameters["overrides"]["gate_init_tokens"] == runner.GATE_INIT_TOKENS > 0


def test_the_study_page_is_written_under_outputs_not_docs():
    study = runner.plan(["gla"], "cpu-quick")[-1]
    assert study.notebook == "05_study.ipynb"
    for key in ("results_page", "figures_dir"):
        assert runner.Path(study.parameters[key]).is_relative_to(runner.OUTPUTS)


def test_estimate_uses_the_median_of_the_same_notebook_else_of_all():
    steps = [runner.Step(nb, runner.Path(f"/x/{i}.ipynb")) for i, nb in
             enumerate(["02_distill.ipynb", "02_distill.ipynb", "03_evaluate.ipynb", "04_benchmark.ipynb"])]
    assert runner.estimate_left(steps, {}) is None
    durations = {"02_distill.ipynb": [100.0, 300.0, 200.0], "03_evaluate.ipynb": [50.0]}
    left, n = runner.estimate_left(steps, durations)
    # distill median 200 twice, evaluate 50, benchmark: the median of all four durations (150)
    assert (left, n) == (200 + 200 + 50 + 150, 4)
    line = runner.progress_line(1, steps, 3725.0, (left, n))
    assert line.startswith("[step 2/4: 02_distill.ipynb") and "elapsed 1:02:05" in line
    assert re.search(r"about 0:10:00 left \(from 4 finished steps\)", line)


def test_the_teachers_evaluation_does_not_predict_a_students():
    teacher_eval = runner.Step("03_evaluate.ipynb", runner.Path("/o/teacher/03_evaluate.ipynb"))
    student_eval = runner.Step("03_evaluate.ipynb", runner.Path("/o/gla/cpu-grid-kd/03_evaluate.ipynb"))
    assert teacher_eval.kind != student_eval.kind
    durations = {teacher_eval.kind: [4600.0], student_eval.kind: [1200.0, 1400.0]}
    assert runner.estimate_left([student_eval] * 3, durations) == (3 * 1300.0, 3)


def test_publish_copies_page_twin_and_figures_and_refuses_without_them(tmp_path):
    from linearize import results as R

    outputs, docs = tmp_path / "outputs", tmp_path / "docs"
    with pytest.raises(SystemExit, match="nothing to publish"):
        runner.publish(outputs, docs)
    study = outputs / "study"
    (study / "figures").mkdir(parents=True)
    (study / "figures" / "validation.png").write_bytes(b"png")
    tasks = {t: R.task_record(0.5, 0.02, 500) for t in R.TASKS}
    R.write_results(study / "results.md", study / "results.json", R.teacher_record("t", 50.0, tasks), [])
    written = runner.publish(outputs, docs)
    assert sorted(p.relative_to(docs).as_posix() for p in written) == [
        "figures/validation.png", "results.json", "results.md"]
    assert json.loads((docs / "results.json").read_text())["teacher"]["name"] == "t"
    (study / "results.json").write_text('{"teacher": {}}')  # a twin off the schema is not published
    with pytest.raises(R.SchemaError):
        runner.publish(outputs, docs)


def test_snapshot_keeps_the_records_not_the_weights(tmp_path):
    outputs = tmp_path / "outputs"
    run = outputs / "gla" / "cpu-grid-kd"
    (run / "stage3").mkdir(parents=True)
    for name in ("params.yaml", "metrics.jsonl", "eval_limit500.json", "stage3/done.json"):
        (run / name).write_text(name)
    absolute = str(runner.ROOT / "outputs" / "gla" / "cpu-grid-kd")
    (run / "03_evaluate.done").write_text(json.dumps({"seconds": 5.0, "parameters": {"run_dir": absolute}}))
    (run / "stage3" / "student.pt").write_bytes(b"weights")
    (outputs / "gla" / "cpu-quick-kd").mkdir(parents=True)
    (outputs / "gla" / "cpu-quick-kd" / "params.yaml").write_text("other preset")
    (outputs / "teacher").mkdir()
    (outputs / "teacher" / "eval_limit500.json").write_text("teacher")
    written = runner.snapshot("cpu-grid", outputs, tmp_path / "snap")
    got = sorted(str(p.relative_to(tmp_path / "snap")) for p in written)
    assert got == ["gla/cpu-grid-kd/03_evaluate.done", "gla/cpu-grid-kd/eval_limit500.json", "gla/cpu-grid-kd/metrics.jsonl",
                   "gla/cpu-grid-kd/params.yaml", "gla/cpu-grid-kd/stage3/done.json", "teacher/eval_limit500.json"]
    # markers are committed: their paths inside the checkout become relative (no machine's paths)
    marker = json.loads((tmp_path / "snap" / "gla" / "cpu-grid-kd" / "03_evaluate.done").read_text())
    assert marker == {"seconds": 5.0, "parameters": {"run_dir": "outputs/gla/cpu-grid-kd"}}


def test_restore_brings_back_whole_finished_folders_only(tmp_path, monkeypatch):
    """A grid resumed on a new machine (empty outputs/) skips the cells its committed records
    say are finished: each folder whose every step is recorded done with today's parameters
    comes back (records, no weights); a half-finished cell, one recorded with other parameters,
    and a folder that already holds work are left to the runner."""
    outputs = tmp_path / "outputs"
    monkeypatch.setattr(runner, "OUTPUTS", outputs)
    steps = runner.plan(["gla", "xlstm", "hgrn2"], "cpu-grid", grid="paper")  # one variant a student
    by_folder = {}
    for step in steps:
        by_folder.setdefault(step.output.parent.name if step.output.parent.name == "teacher"
                             else step.output.parent.parent.name, []).append(step)
    # a finished machine: teacher and gla done; xlstm stopped after its first step; hgrn2 done
    # but evaluated at another document count than the plan asks for now
    for name in ("teacher", "gla", "xlstm", "hgrn2"):
        for i, step in enumerate(by_folder[name]):
            if name == "xlstm" and i > 0:
                break
            step.output.parent.mkdir(parents=True, exist_ok=True)
            step.output.write_text("{}")
            params = dict(step.parameters, limit=100) if name == "hgrn2" and "limit" in step.parameters else step.parameters
            step.marker.write_text(json.dumps({"seconds": 60.0 + i, "parameters": params}))
        folder = by_folder[name][-1].output.parent
        (folder / "params.yaml").write_text(name)
        (folder / "student.pt").write_bytes(b"weights")
    runner.snapshot("cpu-grid", outputs, tmp_path / "snap")
    import shutil
    shutil.rmtree(outputs)  # the new machine
    (outputs / "gla").mkdir(parents=True)
    back = runner.restore(steps, tmp_path / "snap", outputs)
    assert sorted(f.relative_to(outputs).as_posix() for f in back) == ["gla/cpu-grid-qkv-mm-h2h", "teacher"]
    finished = {s.output.relative_to(outputs).as_posix() for s in steps if s.finished()}
    assert finished == {s.output.relative_to(outputs).as_posix() for s in by_folder["teacher"] + by_folder["gla"]}
    assert not (outputs / "gla" / "cpu-grid-qkv-mm-h2h" / "student.pt").exists()  # records, never weights
    marker = json.loads(by_folder["gla"][0].marker.read_text())
    assert marker["seconds"] == 60.0 and marker["restored_from"] == str(tmp_path / "snap")
    assert not (outputs / "xlstm").exists() and not (outputs / "hgrn2").exists()
    # a folder that holds work is never mixed with records: restoring again changes nothing
    (outputs / "xlstm" / "cpu-grid-qkv-mm-h2h").mkdir(parents=True)
    (outputs / "xlstm" / "cpu-grid-qkv-mm-h2h" / "params.yaml").write_text("a new run")
    assert runner.restore(steps, tmp_path / "snap", outputs) == []


def test_snapshot_of_another_checkouts_outputs_is_portable_and_keeps_original_markers(tmp_path):
    """A grid run from another worktree (its outputs/ outside this checkout) snapshots with its
    markers' paths relative to that worktree, as the restore on any machine compares them; and
    a marker --restore brought back does not overwrite the committed original."""
    other = tmp_path / "worktree"
    run = other / "outputs" / "gla" / "cpu-grid-kd"
    run.mkdir(parents=True)
    (run / "params.yaml").write_text("p")
    (run / "03_evaluate.done").write_text(json.dumps({"seconds": 5.0, "parameters": {"run_dir": str(run)}}))
    (run / "01_align.done").write_text(json.dumps({"seconds": 1.0, "parameters": {"run_dir": str(run)},
                                                   "restored_from": "results/cpu-grid"}))
    snap = tmp_path / "snap"
    (snap / "gla" / "cpu-grid-kd").mkdir(parents=True)
    (snap / "gla" / "cpu-grid-kd" / "01_align.done").write_text("the committed original")
    runner.snapshot("cpu-grid", other / "outputs", snap)
    assert json.loads((snap / "gla" / "cpu-grid-kd" / "03_evaluate.done").read_text())["parameters"] == {
        "run_dir": "outputs/gla/cpu-grid-kd"}
    assert (snap / "gla" / "cpu-grid-kd" / "01_align.done").read_text() == "the committed original"
