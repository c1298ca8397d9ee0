"""Checks on the values a notebook is run with (papermill ``-p``, the runner, JupyterLab).

Papermill puts its ``-p`` values into a cell of their own ("injected-parameters") right after
the cell tagged ``parameters``, and only warns in its log about a name that cell does not define:
``-p archh xlstm`` then trains the default student and exits 0. Every notebook therefore calls
:func:`check` in the cell right after its parameters cell: it reads the two cells back from
IPython's input history (``In``), and refuses a name the parameters cell does not define, with
the closest names it does define.

Papermill's ``-p`` turns values it cannot read as numbers or booleans into strings, so a
mapping parameter arrives as ``'{"seq_len": 32}'``; :func:`as_mapping` reads such a string as
YAML (JSON is a subset of YAML), and refuses anything that is not a mapping.
"""
from __future__ import annotations

import ast
import difflib
from collections.abc import Mapping

# The first line of the cell papermill injects (papermill.translators.PythonTranslator.codify).
INJECTED_HEADER = "# Parameters"


class NotebookParameterError(ValueError):
    """A notebook was given a parameter it does not have, or a value it cannot read."""


def assigned_names(source: str) -> list[str]:
    """Names a cell assigns at top level (``x = ...``, ``x: int = ...``, ``a, b = ...``), in order."""
    names: list[str] = []

    def targets(node):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                yield from targets(elt)

    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names.extend(targets(target))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            names.extend(targets(node.target))
    return list(dict.fromkeys(names))


def unknown_parameters(parameters_source: str, injected_source: str) -> list[str]:
    """Names the injected cell sets that the parameters cell does not define."""
    known = set(assigned_names(parameters_source))
    return [name for name in assigned_names(injected_source) if name not in known]


def _explain(unknown: list[str], known: list[str]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"unknown notebook parameter(s): {', '.join(parts)}. This notebook takes: {', '.join(known)}. "
            "Fix the name given with papermill -p (or the runner's parameters).")


def check_sources(parameters_source: str, injected_source: str) -> None:
    """Raise :class:`NotebookParameterError` when the injected cell sets an unknown name."""
    unknown = unknown_parameters(parameters_source, injected_source)
    if unknown:
        raise NotebookParameterError(_explain(unknown, assigned_names(parameters_source)))


def check(namespace: Mapping | None = None) -> list[str]:
    """Call as ``check(globals())`` in the cell right after the parameters cell.

    When the cell executed just before this one is papermill's injected cell, compare the names
    it sets with those of the cell executed before it (the parameters cell) and raise on any
    the parameters cell does not define. Returns the injected names ([] when nothing was
    injected, e.g. a notebook opened and run in JupyterLab)."""
    if namespace is None:
        from IPython import get_ipython

        shell = get_ipython()
        namespace = shell.user_ns if shell is not None else {}
    history = list(namespace.get("In") or [])
    # In[-1] is the cell running now; papermill runs parameters, injected, this cell in a row.
    if len(history) < 3 or not history[-2].lstrip().startswith(INJECTED_HEADER):
        return []
    parameters_source, injected_source = history[-3], history[-2]
    check_sources(parameters_source, injected_source)
    return assigned_names(injected_source)


def as_mapping(value, name: str = "overrides") -> dict:
    """A mapping parameter as a dict: a mapping as it is, None as {}, a string read as YAML/JSON
    (papermill ``-p overrides '{"seq_len": 32}'``)."""
    if value is None:
        return {}
    if isinstance(value, str):
        import yaml

        text = value.strip()
        try:
            value = yaml.safe_load(text) if text else {}
        except yaml.YAMLError as err:
            raise NotebookParameterError(
                f"{name} = {text!r} is neither JSON nor YAML ({err}); pass e.g. "
                f"-p {name} '{{\"seq_len\": 32}}' or -y '{name}: {{seq_len: 32}}'.") from None
        value = {} if value is None else value
    if not isinstance(value, Mapping):
        raise NotebookParameterError(
            f"{name} must be a mapping such as {{\"seq_len\": 32}}, not {type(value).__name__} {value!r}.")
    return dict(value)


def run_params(arch: str, preset: str, overrides, output_root, **notebook_values) -> tuple[dict, str]:
    """``(params, output_root)`` of a training notebook (01_align, 02_distill): ``overrides`` read
    as a mapping, every notebook value left at None deferring to it (then to the student's
    settings and the preset, :func:`linearize.params.resolve`), ``output_root`` resolved against
    the project (None: its outputs/, or ``$LINEARIZE_OUTPUTS``)."""
    from .params import resolve
    from .paths import OUTPUTS, project_path

    given = {k: v for k, v in notebook_values.items() if v is not None}
    params = resolve(arch, preset, {**as_mapping(overrides, "overrides"), **given})
    return params, str(project_path(output_root, OUTPUTS))
