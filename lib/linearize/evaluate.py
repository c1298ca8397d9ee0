"""Evaluate a teacher or a student: the paper's six zero-shot tasks, perplexity and KL.

``evaluate_tasks`` runs lm-evaluation-harness on an in-memory model (tasks from
:mod:`linearize.tasks`: offline data by default, lm-eval's hub tasks with ``online=True``) and
returns a plain dict: per task the unnormalised accuracy the paper reports (``acc``),
``acc_norm`` beside it where lm-eval defines one, LAMBADA's accuracy and perplexity, and the
standard error of each. ``results_table`` lays several such results out like the paper's tables
(Lamb., WinoG., Arc-E, Arc-C, PIQA, HellaS., Avg., in percent), optionally with the paper's own
rows (``PAPER_ROWS`` of :mod:`linearize.paper`; note the paper's teacher was SmolLM-360M, ours
is SmolLM2-135M-Instruct, and the paper's LAMBADA was the mean of standard and OpenAI, ours is
OpenAI only).

``perplexity_and_kl`` (from :mod:`linearize.perplexity`) measures a student against its teacher
on held-out token blocks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from .paper import AVG, COLUMNS, PAPER_ROWS  # noqa: F401  (re-exported: they used to live here)
from .memory import keep_freed_memory, weights_digest
from .perplexity import perplexity_and_kl  # noqa: F401  (re-exported: it used to live here)
from .tasks import PAPER_TASKS, check_task_names, lm_eval_name, load_tasks, task_manager

RESULTS_FILE = "eval_{tag}.json"


@contextlib.contextmanager
def _single_process_bootstrap() -> Iterator[None]:
    """lm-eval bootstraps the perplexity's standard error in a multiprocessing pool of
    cpu_count() workers (forking a process that holds the model); in-process is quick enough
    for our iteration count and safe under pytest and Jupyter."""
    saved = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved


@contextlib.contextmanager
def _no_env_probe() -> Iterator[None]:
    """lm-eval's simple_evaluate ends with ``add_env_info``: torch's collect_env, which runs
    pip and other subprocesses (12.6 s a call on the loaded 2-core machine, a quarter of a
    20-document evaluation, cProfile of benchmarks/eval_speed.py) for keys that evaluate_tasks
    never keeps (it returns ``out["results"]`` only). Our results record the versions that
    matter themselves."""
    import lm_eval.evaluator as ev

    saved = ev.add_env_info
    ev.add_env_info = lambda storage: storage.update(pretty_env_info="not collected (linearize.evaluate)")
    try:
        yield
    finally:
        ev.add_env_info = saved


@contextlib.contextmanager
def linear_weights_in(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """While inside, every ``nn.Linear`` of ``model`` holds its weight (and bias) as a ``dtype``
    copy; the original parameters come back on exit (None: nothing changes).

    Under ``torch.autocast(dtype=...)`` a linear layer casts its float32 weight to ``dtype`` on
    every call: in a bf16 forward at 8 x 128 tokens ``aten::copy_`` (these casts and the
    activations') took 16-17% of the CPU time (``benchmarks/forward_profile.py teacher deltanet
    --bf16``), and casting the weights once made DeltaNet's and GLA's bf16 forward 1.11-1.12x
    faster, the teacher's not measurably (``benchmarks/bf16_cpu.py --cast-once``). Casting once
    gives autocast the same bf16 values (both round to nearest), so the scores are the same, bit
    for bit (``tests/test_evaluate.py``). Each layer gets a new Parameter rather than new data in the
    old one: a weight tied to the embedding (the LM head) keeps the embedding in float32, so the
    residual stream stays float32 as under autocast alone."""
    if dtype is None:
        yield
        return
    swapped = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.dtype != dtype:
                old = (module.weight, module.bias)
                module.weight = torch.nn.Parameter(old[0].detach().to(dtype), requires_grad=False)
                if old[1] is not None:
                    module.bias = torch.nn.Parameter(old[1].detach().to(dtype), requires_grad=False)
                swapped.append((module, old))
    try:
        yield
    finally:
        for module, (weight, bias) in swapped:
            module.weight = weight
            if bias is not None:
                module.bias = bias


def _task_metrics(raw: Mapping[str, object]) -> dict[str, float]:
    """lm-eval's "acc,none"/"acc_stderr,none" keys -> acc/acc_stderr (only the metrics we use)."""
    out = {}
    for metric in ("acc", "acc_norm", "perplexity"):
        for key in (metric, metric + "_stderr"):
            value = raw.get(f"{key},none")
            if isinstance(value, (int, float)):
                out[key] = float(value)
    return out


def evaluate_tasks(
    model,
    tokenizer,
    tasks: str | Iterable[str] = PAPER_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    online: bool = False,
    output_dir: str | os.PathLike | None = None,
    label: str | None = None,
    bootstrap_iters: int = 1000,
    per_doc: bool = True,
    cache: str | os.PathLike | None = None,
    share_context: bool = True,
    workers: int | str = 1,
    autocast: str | None = None,
) -> dict:
    """Zero-shot lm-eval on an in-memory causal LM.

    ``limit`` takes the first ``limit`` documents of each task (quick runs; None = all).
    Returns ``{"model", "tasks": {name: {"acc", "acc_stderr", "acc_norm", ..., "n_docs"}},
    "limit", "online", "wall_time_s", ...}``; fractions in [0, 1] (tables show percent).
    With ``output_dir`` the dict is also written there as ``eval_<full|limitN>[_online].json``.
    ``per_doc`` (default True) also keeps each document's scores (``tasks[name]["per_doc"]``:
    lists in document order of acc, acc_norm, loglikelihood): the paired comparisons of
    :mod:`linearize.compare` and the study page need them, and they cost ~10 bytes a document.
    ``cache``: a path prefix for lm-eval's request cache (SQLite ``<cache>_rank0.db``). Every
    scored request is written as it finishes, so a killed run resumes where it stopped. Its keys
    are the requests only, not the model: give each model (and dtype) its own cache
    (:func:`request_cache` names one after the weights). Split over workers, each worker has a
    file of its own (``<cache>_<its tasks>_rank0.db``): two processes never write one SQLite file.
    ``share_context``: score the choices of a multiple-choice document after one forward of
    their shared context (:mod:`linearize.scoring`; same scores up to float rounding, 1.3x
    faster on HellaSwag and ARC at 2 threads, docs/shared_context.md); False runs lm-eval's
    HFLM unchanged.
    ``workers``: split the tasks over this many processes on the CPU (``"auto"``: one per
    torch thread, at most one per task), each with ``threads // workers`` threads, the tasks
    balanced by their scored tokens (``TASK_TOKENS_500``). The scorer's Python and lm-eval's
    bookkeeping leave a 2-thread process about 1.5 cores busy; two 1-thread processes on the
    six tasks took 0.85x the wall time of one 2-thread process (deltanet, 60 documents, load
    ~1, benchmarks/eval_speed.py). The children are forked, so they share the model's memory.
    Scores are the same up to float rounding of the thread count (a 1-thread matmul sums in
    another order). One process on a GPU or for one task.
    ``autocast``: None (the weights' dtype, float32 here) or ``"bfloat16"``: every forward runs
    under ``torch.autocast`` (lm-eval's ``mixed_precision_dtype``), the log-softmax in float32.
    It pays only on a CPU with bf16 matrix units (AMX): there the teacher's forward ran at 1.84x
    float32's tokens/s, on an AVX2-only CPU at 0.16x (benchmarks/bf16_cpu.py), so it warns on a
    CPU without them. Scores move a little: the six-task average by +0.23 points (-0.17 to
    +0.63) for the teacher at 500 documents and +0.44 (-0.11 to +1.11) for a trained DeltaNet at
    150 (docs/speed.md); a freshly converted student, ill-conditioned, drifts far more.
    ``benchmarks/bf16_eval.py`` measures a model. Results
    go to ``eval_<tag>_bf16.json``, and a request cache must be the dtype's own
    (``request_cache(..., autocast=...)``): cached scores carry no dtype.
    """
    names = check_task_names(tasks)
    _check_autocast(autocast, model)
    keep_freed_memory()  # each batch's logits are large blocks: reuse them, do not refault them
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None (all documents), got {limit!r}")
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)  # sqlitedict makes no folders
    n_workers = _worker_count(workers, model, names)
    if n_workers > 1:
        return _evaluate_split(model, tokenizer, names, n_workers, output_dir, cache, dict(
            limit=limit, batch_size=batch_size, online=online, label=label,
            bootstrap_iters=bootstrap_iters, per_doc=per_doc, share_context=share_context,
            autocast=autocast))
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from .scoring import SharedContextLM

    # One manager for loading and evaluating: without it simple_evaluate builds a default one,
    # indexing all of lm-eval's ~13k task YAMLs (about 30 s here) for nothing.
    manager = task_manager(online)
    task_objs = load_tasks(names, online=online, manager=manager)
    device = str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        lm_class = SharedContextLM if share_context else HFLM
        precision = {} if autocast is None else {"mixed_precision_dtype": autocast, "softmax_dtype": "float32"}
        lm = lm_class(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size, **precision)
        cast = getattr(torch, autocast) if autocast is not None else None  # the casts autocast would redo per call
        with _single_process_bootstrap(), _no_env_probe(), linear_weights_in(model, cast):
            out = simple_evaluate(
                model=lm,
                tasks=list(task_objs.values()),
                num_fewshot=0,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=per_doc,
                task_manager=manager,
                use_cache=None if cache is None else str(cache),
            )
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start

    per_task = {}
    for name in names:
        key = lm_eval_name(name, online)
        metrics = _task_metrics(out["results"][key])
        if "acc" not in metrics:
            raise RuntimeError(f"lm-eval returned no accuracy for {key}: {out['results'][key]}")
        counts = out.get("n-samples", {}).get(key, {})
        metrics["n_docs"] = int(counts.get("effective", 0))
        metrics["n_docs_total"] = int(counts.get("original", 0))
        if per_doc:
            samples = sorted(out["samples"][key], key=lambda s: s["doc_id"])
            # lm-eval's per-document "perplexity" item is the continuation's log-likelihood
            # (the aggregation turns the mean into a perplexity): stored under its real name.
            fields = {"acc": "acc", "acc_norm": "acc_norm", "perplexity": "loglikelihood"}
            metrics["per_doc"] = {"doc_id": [s["doc_id"] for s in samples]} | {
                ours: [float(s[m]) for s in samples] for m, ours in fields.items()
                if samples and m in samples[0]}
        per_task[name] = metrics

    import lm_eval
    import transformers

    results = {
        "model": label or type(model).__name__,
        "tasks": per_task,
        "num_fewshot": 0,
        "limit": limit,
        "online": online,
        "batch_size": batch_size,
        "share_context": share_context,
        "dtype": str(next(model.parameters()).dtype),
        "autocast": autocast,
        "device": device,
        "wall_time_s": round(wall, 1),
        "lm_eval_version": lm_eval.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "lm_eval_results": out["results"],
    }
    if output_dir is not None:
        save_results(results, output_dir)
    return results


# Tokens each task feeds the shared-context scorer at 500 documents (SmolLM2's tokenizer,
# benchmarks/eval_speed.py --count-tokens --limit 500): the weights that balance a split.
TASK_TOKENS_500 = {"lambada_openai": 39192, "winogrande": 19522, "arc_easy": 40046,
                   "arc_challenge": 47922, "piqa": 35275, "hellaswag": 67498}


def _worker_count(workers, model, names) -> int:
    if workers == "auto":
        workers = torch.get_num_threads()
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int or 'auto', got {workers!r}")
    if next(model.parameters()).device.type != "cpu":
        return 1
    return min(workers, len(names))


def split_tasks(names: list[str], workers: int) -> list[list[str]]:
    """The tasks in at most ``workers`` groups of about equal scored tokens (largest first,
    each to the lightest group); each group keeps the order the tasks were given in."""
    groups: list[list[str]] = [[] for _ in range(workers)]
    load = [0] * workers
    for name in sorted(names, key=lambda n: -TASK_TOKENS_500[n]):  # names: the six, checked
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += TASK_TOKENS_500[name]
    return [[n for n in names if n in g] for g in groups if g]


def _group_cache(cache, group: list[str]):
    """The request cache of one worker: its own SQLite file, named after its tasks (a file per
    process, so no two processes write one database; the same split finds the same file)."""
    return None if cache is None else f"{cache}_{'+'.join(group)}"


@contextlib.contextmanager
def _warned_already():
    """Inside a split evaluation's workers: the caller's evaluate_tasks has already warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowAutocastWarning)
        yield


def _evaluate_split(model, tokenizer, names, workers, output_dir, cache, kwargs) -> dict:
    """evaluate_tasks over task groups, groups 1.. in forked children and group 0 here, the
    per-task results merged into one result for all the tasks."""
    import multiprocessing as mp
    import traceback

    groups = split_tasks(names, workers)
    threads = torch.get_num_threads()
    per_worker = max(1, threads // len(groups))
    ctx = mp.get_context("fork")
    start = time.perf_counter()

    def child(group, conn):
        try:
            torch.set_num_threads(per_worker)
            with _warned_already():
                conn.send(("ok", evaluate_tasks(model, tokenizer, tasks=group, workers=1,
                                                cache=_group_cache(cache, group), **kwargs)))
        except BaseException:  # noqa: BLE001 - the parent raises it again, with the traceback
            conn.send(("error", traceback.format_exc()))
        finally:
            conn.close()

    procs = []
    for group in groups[1:]:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child, args=(group, send), daemon=True)
        proc.start()
        send.close()
        procs.append((group, proc, recv))
    try:
        torch.set_num_threads(per_worker)
        with _warned_already():
            parts = [evaluate_tasks(model, tokenizer, tasks=groups[0], workers=1,
                                    cache=_group_cache(cache, groups[0]), **kwargs)]
        for group, proc, recv in procs:
            try:
                status, payload = recv.recv()  # before join: a large result would fill the pipe
            except EOFError:
                proc.join()
                raise RuntimeError(f"the evaluation worker for {group} died (exit code "
                                   f"{proc.exitcode}) without a result; run with workers=1 to "
                                   "see its error in this process") from None
            proc.join()
            if status != "ok":
                raise RuntimeError(f"the evaluation worker for {group} failed:\n{payload}")
            parts.append(payload)
    finally:
        torch.set_num_threads(threads)
        for _, proc, _ in procs:
            if proc.is_alive():
                proc.terminate()
    merged = dict(parts[0])
    tasks = {n: t for p in parts for n, t in p["tasks"].items()}
    merged["tasks"] = {n: tasks[n] for n in names}
    merged["lm_eval_results"] = {k: v for p in parts for k, v in p["lm_eval_results"].items()}
    merged["wall_time_s"] = round(time.perf_counter() - start, 1)
    merged["workers"] = [{"tasks": g, "threads": per_worker, "wall_time_s": p["wall_time_s"]}
                         for g, p in zip(groups, parts)]
    if output_dir is not None:
        save_results(merged, output_dir)
    return merged


AUTOCAST_DTYPES = ("bfloat16",)


class SlowAutocastWarning(UserWarning):
    """bf16 autocast asked for on a CPU without bf16 instructions (filter it by this class)."""


def _check_autocast(autocast, model) -> None:
    if autocast is None:
        return
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None (the weights' dtype) or one of {AUTOCAST_DTYPES}, got {autocast!r}")
    if next(model.parameters()).device.type == "cpu" and not _cpu_has_bf16():
        warnings.warn("autocast='bfloat16' on a CPU without bf16 instructions: every matmul converts its "
                      "operands, so evaluation runs several times slower than float32 (0.16x measured on an "
                      "AVX2-only CPU, benchmarks/bf16_cpu.py); leave autocast=None here.",
                      SlowAutocastWarning, stacklevel=3)


def _cpu_has_bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def request_cache(directory: str | os.PathLike, model, share_context: bool = True,
                  autocast: str | None = None) -> Path:
    """A request-cache prefix for ``evaluate_tasks(cache=...)`` under ``directory``, named after
    the model's weights (:func:`weights_digest`) and the scorer: lm-eval's cache keys hold the
    requests only, so a student retrained in the same folder must not find the old scores. An
    evaluation killed half-way (a session's end) resumes from the requests already scored."""
    scorer = ("shared" if share_context else "hflm") + ("" if autocast is None else f"_{autocast}")
    return Path(directory) / "eval_cache" / f"{weights_digest(model)[:20]}_{scorer}"


def results_path(output_dir: str | os.PathLike, limit: int | None, online: bool, autocast: str | None = None) -> Path:
    tag = (("full" if limit is None else f"limit{limit}") + ("_online" if online else "")
           + ("" if autocast is None else "_bf16"))
    return Path(output_dir) / RESULTS_FILE.format(tag=tag)


def save_results(results: dict, output_dir: str | os.PathLike) -> Path:
    path = results_path(output_dir, results["limit"], results["online"], results.get("autocast"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def load_results(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def table_row(results: Mapping, metric: str = "acc") -> dict[str, float]:
    """One table row in percent. ``metric="acc_norm"`` uses acc_norm where the task has it
    (LAMBADA has none: its acc is used). Avg. only when all six tasks are present, so that a
    partial run never shows an average that is not comparable with the paper's."""
    tasks = results["tasks"]
    row = {}
    for name, col in COLUMNS.items():
        if name in tasks:
            m = tasks[name]
            row[col] = 100.0 * m.get(metric, m["acc"])
    cols = list(COLUMNS.values())
    row[AVG] = sum(row[c] for c in cols) / len(cols) if all(c in row for c in cols) else math.nan
    return row


def results_table(
    results_by_model: Mapping[str, Mapping],
    paper_rows: Mapping[str, Mapping[str, float]] | None = None,
    metric: str = "acc",
    decimals: int = 2,
):
    """A DataFrame in the paper's format: one row per model (percent), columns Lamb., WinoG.,
    Arc-E, Arc-C, PIQA, HellaS., Avg. Values of ``results_by_model`` are ``evaluate_tasks``
    results (or rows already in table form); ``paper_rows`` (e.g. ``PAPER_ROWS``) are appended
    and keep the labels that mark them as the paper's."""
    import pandas as pd

    rows = {}
    for label, res in results_by_model.items():
        rows[label] = table_row(res, metric) if "tasks" in res else dict(res)
    for label, row in (paper_rows or {}).items():
        rows[label] = dict(row)
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[*COLUMNS.values(), AVG])
    frame.index.name = "model"
    return frame.astype(float).round(decimals)


# ---- loading a model to evaluate ----

def load_model(source: str | os.PathLike | None = None):
    """(model, tokenizer, label) from a run folder, a saved model folder or a teacher name.

    * a run folder of ``linearize.stages`` (``params.yaml`` + ``stageN/student.pt``): the
      student is converted from the run's teacher as the run did and given the weights of its
      last finished stage (a run with no finished stage gives the fresh conversion);
    * a folder with ``config.json`` (``save_pretrained``): loaded with ``AutoModelForCausalLM``
      (``import linearize`` registers the student classes); a Llama folder loads as a teacher;
    * anything else is a teacher name for ``linearize.teacher.load_teacher`` (None = embedded).
    Students come with their teacher's tokenizer unless their folder holds one.
    """
    from .teacher import load_teacher

    path = Path(source) if source not in (None, "") else None
    if path is None or not path.is_dir():
        model, tok = load_teacher(source)
        return model, tok, str(source or "smollm2-135m-instruct")
    if (path / "params.yaml").exists() and not (path / "config.json").exists():
        return _load_run_student(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} is neither a run folder (params.yaml with stageN/student.pt) nor a saved "
            "model (config.json): pass a run folder, a save_pretrained folder or a teacher name."
        )
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "llama":
        model, tok = load_teacher(path)
        return model, tok, path.name
    import linearize.modeling  # noqa: F401  (registers the student with AutoModelForCausalLM)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if (path / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(path)
    else:
        _, tok = load_teacher(getattr(model.config, "teacher", None))
    return model, tok, path.name


def _load_run_student(run_dir: Path):
    import yaml

    from .runs import Run, latest_stage, load_student
    from .teacher import load_teacher

    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    teacher, tok = load_teacher(params["teacher"])
    # is_main=False: reading a run must not rewrite its params.yaml.
    run = Run(params, root=run_dir.parent.parent, is_main=False)
    if run.dir.resolve() != run_dir.resolve():
        raise ValueError(f"{run_dir} does not match its params.yaml (arch {params['arch']!r}, "
                         f"run_name {params['run_name']!r}): expected it at {run.dir}")
    train_blocks = None
    if (params.get("readout_fit_tokens") or params.get("gate_init_tokens")) and latest_stage(run, 4) is None:
        # a conversion-only run with the readout fit / gate init: redo them on the same blocks as training
        from .data import token_blocks

        train_blocks = token_blocks(tok, params["corpus"], params["seq_len"], "train", params["val_fraction"])
    student, start = load_student(run, teacher, params, before=4, train_blocks=train_blocks)
    del teacher
    return student.eval(), tok, f"{params['arch']}/{params['run_name']} ({start})"
