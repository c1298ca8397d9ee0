"""Notebook parameters: papermill's injected cell is checked against the parameters cell, and a
mapping parameter given as a JSON/YAML string (papermill -p) is read as a mapping."""
import nbformat
import pytest

from linearize import notebook_params as NP
from linearize.paths import ROOT

PARAMETERS = 'arch = "gla"          # student\npreset = "cpu-quick"\noverrides = {}\nstage1_tokens: int = None\n'


def test_names_the_parameters_cell_does_not_define_are_refused_with_the_closest_name():
    assert NP.assigned_names(PARAMETERS) == ["arch", "preset", "overrides", "stage1_tokens"]
    NP.check_sources(PARAMETERS, '# Parameters\narch = "xlstm"\nstage1_tokens = 64\n')  # known names pass
    with pytest.raises(NP.NotebookParameterError, match=r"'archh' \(did you mean 'arch'\?\)") as err:
        NP.check_sources(PARAMETERS, '# Parameters\narchh = "xlstm"\npreset = "cpu-study"\n')
    assert "This notebook takes: arch, preset, overrides, stage1_tokens" in str(err.value)


def test_check_reads_the_cells_papermill_ran_from_the_input_history():
    injected = '# Parameters\narchh = "xlstm"\n'
    with pytest.raises(NP.NotebookParameterError, match="archh"):
        NP.check({"In": ["", PARAMETERS, injected, "notebook_params.check(globals())"]})
    # opened in JupyterLab: no injected cell right before the check, nothing to compare
    assert NP.check({"In": ["", PARAMETERS, "notebook_params.check(globals())"]}) == []
    assert NP.check({"In": ["", PARAMETERS, '# Parameters\narch = "xlstm"\n', "check"]}) == ["arch"]


def test_mapping_parameters_accept_json_and_yaml_strings():
    assert NP.as_mapping('{"seq_len": 32}') == {"seq_len": 32}
    assert NP.as_mapping("seq_len: 32\nstage2_lr: 1.0e-4") == {"seq_len": 32, "stage2_lr": 1e-4}
    assert NP.as_mapping({"a": 1}) == {"a": 1} and NP.as_mapping(None) == {} and NP.as_mapping("") == {}
    with pytest.raises(NP.NotebookParameterError, match="must be a mapping"):
        NP.as_mapping("[1, 2]")
    with pytest.raises(NP.NotebookParameterError, match="neither JSON nor YAML"):
        NP.as_mapping('{"seq_len": 32')


def _head(notebook: str, path, cells: int):
    """The notebook's first ``cells`` cells (markdown, parameters, set-up): its own code, without
    the training or evaluation that follows."""
    nb = nbformat.read(ROOT / "notebooks" / notebook, as_version=4)
    nb.cells = nb.cells[:cells]
    nbformat.write(nb, path)
    return path


def test_papermill_typo_fails_and_overrides_string_is_read(tmp_path):
    """Through papermill and a real kernel, on 01_align's own parameters and set-up cells."""
    import papermill as pm

    head = _head("01_align.ipynb", tmp_path / "head.ipynb", 3)
    with pytest.raises(pm.PapermillExecutionError, match="did you mean 'arch'"):
        pm.execute_notebook(str(head), str(tmp_path / "typo.ipynb"), parameters={"archh": "xlstm"},
                            kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    out = pm.execute_notebook(str(head), str(tmp_path / "ok.ipynb"),
                              parameters={"arch": "xlstm", "overrides": '{"seq_len": 32, "batch_size": 3}'},
                              kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    printed = "".join(o.get("text", "") for o in out.cells[-1].outputs)
    assert "arch: xlstm" in printed and "seq_len: 32" in printed and "batch_size: 3" in printed


def test_every_parameter_the_runner_passes_is_defined_by_its_notebook():
    from linearize import runner

    for grid in runner.GRIDS:
        for step in runner.plan(["gla", "deltanet"], "cpu-quick", grid=grid):
            nb = nbformat.read(ROOT / "notebooks" / step.notebook, as_version=4)
            cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
            injected = "# Parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in step.parameters.items())
            NP.check_sources(cell.source, injected)


def test_path_parameters_resolve_under_the_project_root(tmp_path):
    from linearize.paths import OUTPUTS, project_path

    assert project_path(None, OUTPUTS) == OUTPUTS and project_path("", OUTPUTS) == OUTPUTS
    assert project_path("docs/figures", OUTPUTS) == ROOT / "docs" / "figures"  # not the working directory
    assert project_path(tmp_path, OUTPUTS) == tmp_path


def test_run_params_defers_none_to_overrides_and_reads_a_string(tmp_path, monkeypatch):
    from linearize.notebook_params import run_params

    params, root = run_params("gla", "cpu-quick", '{"seq_len": 32, "seed": 5}', None, seed=None, run_name="x")
    assert params["seq_len"] == 32 and params["seed"] == 5 and params["run_name"] == "x"
    params, _ = run_params("gla", "cpu-quick", {"seed": 5}, None, seed=7)  # a notebook value wins over overrides
    assert params["seed"] == 7
    assert run_params("gla", "cpu-quick", {}, str(tmp_path))[1] == str(tmp_path)
    with pytest.raises(ValueError):
        run_params("gla", "cpu-quick", "[1, 2]", None)
