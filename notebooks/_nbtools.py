"""What the notebook builders (``_build_*.py``) share: the parameters cell papermill fills in,
the kernel metadata, and validated writing. Run a builder as a script (``python
notebooks/_build_study.py``); this folder is then on ``sys.path``, so ``import _nbtools`` works."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

HERE = Path(__file__).resolve().parent


def parameters_cell(source: str):
    """The cell tagged ``parameters``: papermill injects its ``-p`` values right after it."""
    return new_code_cell(source.strip(), metadata={"tags": ["parameters"]})


def notebook(cells) -> nbformat.NotebookNode:
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })


def write(nb: nbformat.NotebookNode, name: str) -> Path:
    """Validate ``nb`` and write it as notebooks/<name>. Cell ids are numbered rather than
    random, so rebuilding an unchanged notebook leaves its file unchanged."""
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"
    nbformat.validate(nb)
    path = HERE / name
    nbformat.write(nb, path)
    print("wrote", path)
    return path
