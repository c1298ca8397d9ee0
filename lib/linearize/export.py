"""A student as a Hugging Face model folder that opens without this project's loaders.

``save_student_folder(student, tokenizer, path)`` writes ``save_pretrained``'s files (config,
safetensors weights, generation config), the tokenizer's files and a two-line module,
``linearize_student.py``, that the config's ``auto_map`` names. So the folder opens with

* ``AutoModelForCausalLM.from_pretrained(path)`` after ``import linearize`` (the import
  registers the ``linearized_llama`` model type with transformers' Auto classes), or
* ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` with no import: the
  module in the folder imports ``linearize.modeling`` from the installed package;
* lm-eval: ``lm_eval --model hf --model_args pretrained=<path>,trust_remote_code=True ...``
  (lm-eval's CLI never imports linearize, so it needs ``trust_remote_code=True``).

Either way the ``linearize`` package must be installed where the folder is opened: the
mixers' code lives there, not in the folder. Nothing is converted or refitted on load.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

SHIM_FILE = "linearize_student.py"
SHIM = '''"""A linearize student: its classes live in the installed `linearize` package (the
project's `pip install -e .`); this file only names them for transformers' auto_map."""
from linearize.modeling import LinearizedLlamaConfig, LinearizedLlamaForCausalLM  # noqa: F401
'''
AUTO_MAP = {
    "AutoConfig": "linearize_student.LinearizedLlamaConfig",
    "AutoModelForCausalLM": "linearize_student.LinearizedLlamaForCausalLM",
}


@contextmanager
def _without_auto_class(*classes):
    """Loading with ``trust_remote_code`` marks our classes for transformers' code export
    (``_auto_class``); a later ``save_pretrained`` would then copy ``linearize/modeling.py``
    into the folder, a file that cannot run outside its package. Unmark them while saving."""
    saved = [(c, c.__dict__.get("_auto_class", None), "_auto_class" in c.__dict__) for c in classes]
    for c in classes:
        c._auto_class = None
    try:
        yield
    finally:
        for c, value, had in saved:
            if had:
                c._auto_class = value
            else:
                del c._auto_class


def save_student_folder(student, tokenizer, path: str | os.PathLike) -> Path:
    """Write ``student`` (a ``LinearizedLlamaForCausalLM``) and ``tokenizer`` (the teacher's) to
    the folder ``path``, replacing it if it exists (written into a temporary sibling first, then
    renamed, so a crash never leaves a half folder). Returns the path. ``tokenizer=None`` writes
    the model alone, with a warning: the folder then needs the teacher's tokenizer beside it."""
    from .modeling import LinearizedLlamaForCausalLM

    if not isinstance(student, LinearizedLlamaForCausalLM):
        raise TypeError(f"save_student_folder saves a LinearizedLlamaForCausalLM, got {type(student).__name__}; "
                        "a teacher is saved with its own save_pretrained.")
    if tokenizer is None:
        logger.warning("save_student_folder: no tokenizer given, so %s holds none; lm-eval then needs "
                       "tokenizer=<the teacher> in --model_args.", path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _without_auto_class(type(student), type(student.config)):
            student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SHIM_FILE).write_text(SHIM)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config["auto_map"] = dict(AUTO_MAP)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
