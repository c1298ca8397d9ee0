"""Load FLA's pure-PyTorch references (fla/ops/<family>/naive.py) by file path.

Importing ``fla.ops`` pulls in triton and wants a GPU; the naive files only need torch (and
einops), so tests load them directly. Missing file -> the calling test is skipped, saying why."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

FLA_OPS = (Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
           / "site-packages" / "fla" / "ops")


def fla_naive(family: str):
    path = FLA_OPS / family / "naive.py"
    if not path.exists():
        pytest.skip(f"FLA reference {path} not installed (pip install flash-linear-attention)")
    spec = importlib.util.spec_from_file_location(f"fla_naive_{family}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
