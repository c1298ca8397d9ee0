import nbformat
import pytest

from linearize import runner


@pytest.fixture
def tiny_notebook(tmp_path, monkeypatch):
    """A one-cell notebook that appends a line to a counter file, so we can count executions."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("counter = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("open(counter, 'a').write('ran\\n')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nbformat.write(nb, folder / "count.ipynb")
    monkeypatch.setattr(runner, "NOTEBOOKS", folder)
    return tmp_path / "counter.txt"


def test_finished_step_is_skipped_and_missing_output_redone(tmp_path, tiny_notebook):
    step = runner.Step("count.ipynb", tmp_path / "out" / "count.ipynb", {"counter": str(tiny_notebook)})
    assert runner.run_step(step).startswith("done")
    assert runner.run_step(step) == "skipped"
    assert tiny_notebook.read_text().count("ran") == 1
    step.output.unlink()  # the executed notebook is gone: the step runs again
    assert runner.run_step(step).startswith("done")
    assert tiny_notebook.read_text().count("ran") == 2
    step.marker.unlink()  # a step that never finished (no marker) runs again
    assert runner.run_step(step).startswith("done")
    assert runner.run_step(step, force=True).startswith("done")
    assert tiny_notebook.read_text().count("ran") == 4


def test_step_with_changed_parameters_is_redone(tmp_path, tiny_notebook):
    step = runner.Step("count.ipynb", tmp_path / "out" / "count.ipynb", {"counter": str(tiny_notebook), "limit": 100})
    assert runner.run_step(step).startswith("done")
    assert runner.run_step(step) == "skipped"
    step.parameters["limit"] = 500  # e.g. another --eval-limit: the old result must not stand
    assert not step.finished()
    assert runner.run_step(step).startswith("done")
    assert tiny_notebook.read_text().count("ran") == 2
    step.marker.write_text("{not json")  # a damaged marker is not trusted
    assert not step.finished()


def test_paths_inside_the_repository_compare_relative():
    inside = str(runner.ROOT / "outputs" / "gla")
    assert runner._portable({"out": inside, "n": [inside]}) == {"out": "outputs/gla", "n": ["outputs/gla"]}
    assert runner._portable({"out": "/elsewhere/x"}) == {"out": "/elsewhere/x"}


def test_study_step_is_redone_after_any_earlier_step_ran(tmp_path, tiny_notebook, monkeypatch):
    (runner.NOTEBOOKS / "count.ipynb").rename(runner.NOTEBOOKS / "05_study.ipynb")
    nb = nbformat.read(runner.NOTEBOOKS / "05_study.ipynb", as_version=4)
    nbformat.write(nb, runner.NOTEBOOKS / "count.ipynb")
    first = runner.Step("count.ipynb", tmp_path / "a.ipynb", {"counter": str(tiny_notebook), "n": 1})
    study = runner.Step("05_study.ipynb", tmp_path / "s.ipynb", {"counter": str(tiny_notebook)})
    steps = [first, study]
    monkeypatch.setattr(runner, "plan", lambda *a, **k: steps)
    monkeypatch.setattr(runner, "OUTPUTS", tmp_path / "outputs")  # its lock, not a real study's
    runner.main([])  # both run
    runner.main([])  # both skipped
    assert tiny_notebook.read_text().count("ran") == 2
    first.parameters["n"] = 2
    runner.main([])  # the first step runs again, so the study does too
    assert tiny_notebook.read_text().count("ran") == 4


def test_failed_step_leaves_no_marker(tmp_path, tiny_notebook):
    step = runner.Step("count.ipynb", tmp_path / "out" / "count.ipynb", {"counter": str(tmp_path / "no" / "dir")})
    with pytest.raises(Exception):
        runner.run_step(step)
    assert not step.finished()


def test_a_hung_cell_times_out_and_the_runner_says_where_to_look(tmp_path, tiny_notebook, monkeypatch, capsys):
    nb = nbformat.read(runner.NOTEBOOKS / "count.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import time; time.sleep(60)"))
    nbformat.write(nb, runner.NOTEBOOKS / "05_study.ipynb")
    monkeypatch.setattr(runner, "CELL_TIMEOUT_S", {"05_study.ipynb": 3})
    study = runner.Step("05_study.ipynb", tmp_path / "s.ipynb", {"counter": str(tiny_notebook)})
    after = runner.Step("count.ipynb", tmp_path / "after.ipynb", {"counter": str(tiny_notebook)})
    monkeypatch.setattr(runner, "plan", lambda *a, **k: [study, after])
    monkeypatch.setattr(runner, "OUTPUTS", tmp_path / "outputs")  # its lock, not a real study's
    assert runner.main([]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and str(study.output) in err and "run the same command again" in err
    assert not study.finished() and not after.finished()  # nothing after a failure runs
    assert tiny_notebook.read_text().count("ran") == 1  # the first cell ran, the sleeping one was cut


def test_plan_orders_the_study():
    steps = runner.plan(["gla", "deltanet"], "cpu-quick", grid="table2")
    names = [s.notebook for s in steps]
    assert names[0] == "00_teacher.ipynb"
    runs = [(s.output.parent.parent.name, s.output.parent.name) for s in steps if s.notebook == "02_distill.ipynb"]
    # variant by variant (whole columns first), students in the order asked
    assert runs == [("gla", "cpu-quick-kd"), ("deltanet", "cpu-quick-kd"),
                    ("gla", "cpu-quick-mm"), ("deltanet", "cpu-quick-mm")]
    kd = next(s for s in steps if s.notebook == "01_align.ipynb")
    assert kd.parameters["qkv_copy"] is False and kd.parameters["matrix_mixing"] is False


def test_plan_rejects_unknown_student_and_grid():
    with pytest.raises(SystemExit, match="unknown student"):
        runner.plan(["transformer-xl"], "cpu-quick")
    with pytest.raises(SystemExit, match="unknown grid"):
        runner.plan(["gla"], "cpu-quick", grid="everything")
