"""Each notebook is edited as a jupytext percent-format source (notebooks/NN_name.py) paired with
the .ipynb that papermill and the runner execute: the two must hold the same cells."""
import nbformat
import pytest

from linearize.paths import ROOT

NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def _cells(nb):
    return [(c.cell_type, c.source.strip(), "parameters" in c.metadata.get("tags", [])) for c in nb.cells]


def test_every_notebook_has_a_source_and_every_source_a_notebook():
    notebooks = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert notebooks == [p.stem for p in SOURCES] and len(notebooks) == 6


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_in_sync_with_its_jupytext_source(source):
    import jupytext

    text = jupytext.read(source)
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    nbformat.validate(nb)
    assert _cells(nb) == _cells(text), (
        f"{source.with_suffix('.ipynb').name} differs from {source.name}: edit the .py and run "
        f"`jupytext --sync notebooks/{source.name}` (or open it in JupyterLab with jupytext installed)")
    # papermill injects its values after the cell tagged "parameters": exactly one per notebook
    assert sum(tagged for *_, tagged in _cells(nb)) == 1
    assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_executed_outputs_are_not_committed(source):
    """The committed .ipynb is a clean input: no outputs or execution counts to go stale."""
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
