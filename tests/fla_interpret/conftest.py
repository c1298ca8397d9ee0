"""FLA's Triton kernels on the CPU, under Triton's interpreter (TRITON_INTERPRET=1).

This directory runs in its own pytest process (``make test-fla``, i.e.
``pytest --fla-interpret``): triton reads TRITON_INTERPRET when FLA's kernels are decorated,
so it must be set before triton is imported, which a process shared with other tests cannot
promise. tests/conftest.py keeps this directory out of every other run.

Two patches make FLA 0.6.0 run under the interpreter of triton 3.9.0. They live here, in the
tests, and change nothing in lib/:
* autotuning: the interpreter has no driver to time configs with, so every autotuned kernel
  takes the first config that survives its pruning;
* loop variables: interpreted ``for i in range(...)`` loops give Python ints, and FLA calls
  ``i_t.to(tl.int64)`` on them; each loop variable is wrapped as a triton tensor at the start of
  the loop body (the interpreter already wraps every assigned value so).
The interpreter stores bfloat16 as uint16 and computes wrong values with it (triton issue
#4972), so these tests use float32 and float16 only.
"""
from __future__ import annotations

import ast
import os
import sys

import pytest

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise pytest.UsageError(
        "triton was imported before tests/fla_interpret could set TRITON_INTERPRET=1; run this "
        "directory in its own process: pytest --fla-interpret (make test-fla)")
os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[fla]'")
fla = pytest.importorskip("fla", reason="flash-linear-attention is not installed: pip install -e '.[fla]'")

import triton.runtime.autotuner as _autotuner  # noqa: E402
import triton.runtime.interpreter as _interpreter  # noqa: E402

PINNED = {"triton": "3.9.0", "fla": "0.6.0"}
_found = {"triton": triton.__version__, "fla": fla.__version__}
if _found != PINNED:
    raise pytest.UsageError(
        f"tests/fla_interpret patches Triton's interpreter for {PINNED}, found {_found}; "
        "install the pinned versions (pip install -c requirements/cpu-lock.txt -e '.[fla]')")


def _first_config(prune, self, kwargs):
    return prune(self, kwargs)[:1]


class _LoopVariablesAsTensors(_interpreter.ASTTransformer):
    def visit_For(self, node):
        node = self.generic_visit(node)
        if isinstance(node.target, ast.Name):
            name = node.target.id
            wrap = ast.Assign(
                targets=[ast.Name(id=name, ctx=ast.Store())],
                value=ast.Call(
                    func=ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                                       attr="to_tensor", ctx=ast.Load()),
                    args=[ast.Name(id=name, ctx=ast.Load()), ast.Constant(value=False)], keywords=[]))
            node.body.insert(0, ast.copy_location(wrap, node.body[0]))
        return node


def _patch():
    prune = _autotuner.Autotuner.prune_configs
    _autotuner.Autotuner.prune_configs = lambda self, kwargs: _first_config(prune, self, kwargs)
    _interpreter.FunctionRewriter.ast_transformer = _LoopVariablesAsTensors()


_patch()


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.fla_interpret)


@pytest.fixture(autouse=True)
def fla_on_cpu():
    """Turn on the dispatch's interpreter test hook for each test, and off afterwards."""
    from linearize.kernels import dispatch

    dispatch.allow_cpu_under_triton_interpreter(True)
    yield
    dispatch.allow_cpu_under_triton_interpreter(False)


class FlaCalls:
    """Counts calls of FLA's chunk entry points, so a silent fall back to our kernels fails."""

    NAMES = ("chunk_gla", "chunk_simple_gla", "chunk_delta_rule")

    def __init__(self, monkeypatch):
        import fla.ops

        self.counts = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            original = getattr(fla.ops, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(fla.ops, name, counted)

    def total(self):
        return sum(self.counts.values())

    def reset(self):
        self.counts = dict.fromkeys(self.NAMES, 0)


@pytest.fixture
def fla_calls(monkeypatch):
    return FlaCalls(monkeypatch)
