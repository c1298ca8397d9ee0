"""Paired comparisons of models evaluated on the same documents.

Two students scored on the same first N documents of a task make correlated errors (the hard
documents are hard for both), so comparing their two accuracies with independent standard
errors wastes most of the evidence. Here every comparison is paired over documents:

* :func:`mcnemar` - McNemar's exact test per task: only the discordant documents (one model
  right, the other wrong) carry information, and under "no difference" each falls either way
  with probability 1/2, so the count is Binomial(discordant, 1/2).
* :func:`paired_bootstrap` - the difference in accuracy per task and in the six-task average,
  with a percentile interval and a two-sided p-value from resampling documents (the same
  resampled documents for both models; tasks resampled independently, each keeping its size).
* :func:`spearman_bootstrap` - the Spearman rank correlation between our models' averages and
  reference numbers (the paper's Table 2), with an interval from resampling documents, which
  says how much of the ranking is measurement noise at our document counts.
* :func:`above_chance_margin` - (student avg - chance avg) / (teacher avg - chance avg).

Inputs are per-document correctness: ``{task: sequence of 0/1 in document order}``, e.g.
:func:`correctness` of an ``evaluate_tasks(..., per_doc=True)`` result. Two models are only
compared on documents both were scored on (matched by document id).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .tasks import PAPER_TASKS

# Chance accuracy of each task for the above-chance margin: LAMBADA is open-vocabulary (0),
# WinoGrande and PIQA have two options, ARC and HellaSwag four (a few ARC questions have 3 or
# 5; the study uses the nominal 1/4).
CHANCE = {"lambada_openai": 0.0, "winogrande": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25,
          "piqa": 0.5, "hellaswag": 0.25}


class CompareError(ValueError):
    """Per-document results that cannot be compared (names the fix)."""


def correctness(results: Mapping, metric: str = "acc") -> dict[str, dict[int, float]]:
    """``{task: {doc_id: 0/1}}`` from an ``evaluate_tasks`` result saved with per-document
    scores (``per_doc=True``; :mod:`linearize.evaluate` keeps them by default)."""
    out = {}
    for task, m in results["tasks"].items():
        per_doc = m.get("per_doc")
        if not per_doc or metric not in per_doc:
            raise CompareError(
                f"the results of {results.get('model', '?')} hold no per-document {metric!r} for {task}: "
                "evaluate again with evaluate_tasks(..., per_doc=True) (notebook 03 does by default).")
        out[task] = dict(zip(map(int, per_doc["doc_id"]), map(float, per_doc[metric])))
    return out


def _paired(a: Mapping, b: Mapping, tasks) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, the two models' correctness on the documents both have, as float arrays.
    Values may be {doc_id: x} mappings (matched by id) or sequences (taken as the same docs)."""
    tasks = list(tasks) if tasks is not None else [t for t in a if t in b]
    out = {}
    for task in tasks:
        if task not in a or task not in b:
            raise CompareError(f"task {task!r} is missing from one of the two models' results")
        x, y = a[task], b[task]
        if isinstance(x, Mapping) != isinstance(y, Mapping):
            raise CompareError(f"{task}: pass both models as {{doc_id: value}} or both as sequences")
        if isinstance(x, Mapping):
            ids = sorted(set(x) & set(y))
            xs, ys = [x[i] for i in ids], [y[i] for i in ids]
        else:
            if len(x) != len(y):
                raise CompareError(f"{task}: {len(x)} against {len(y)} documents; pass {{doc_id: value}} "
                                   "mappings to compare the documents both were scored on")
            xs, ys = x, y
        if not len(xs):
            raise CompareError(f"{task}: the two models share no scored document")
        out[task] = (np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
    return out


# ---------------------------------------------------------------------------------------
# McNemar
# ---------------------------------------------------------------------------------------
def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` documents only the first model got right and
    ``c`` only the second: P(a Binomial(b+c, 1/2) count as far from (b+c)/2 as observed),
    doubled and capped at 1 (the distribution is symmetric). 1.0 when nothing is discordant."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # exact integer arithmetic, then one division: no cancellation for large n
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar(a: Mapping, b: Mapping, tasks=None) -> dict[str, dict]:
    """Per task: documents compared, ``only_a`` / ``only_b`` right, and the exact p-value."""
    out = {}
    for task, (x, y) in _paired(a, b, tasks).items():
        xa, yb = x > 0.5, y > 0.5
        only_a, only_b = int(np.sum(xa & ~yb)), int(np.sum(~xa & yb))
        out[task] = {"docs": len(x), "only_a": only_a, "only_b": only_b, "p": mcnemar_exact(only_a, only_b)}
    return out


# ---------------------------------------------------------------------------------------
# Bootstrap over documents
# ---------------------------------------------------------------------------------------
def _weights(rng: np.random.Generator, n: int, iters: int) -> np.ndarray:
    """[iters, n] resampling counts: row r says how often each document is drawn in resample r
    (a multinomial draw is the same as n draws with replacement, and turns means into matmuls)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=iters).astype(float)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _two_sided_p(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value for "difference = 0": twice the smaller share of resampled
    differences on either side of zero (ties count half), capped at 1."""
    below = np.mean(samples < 0) + 0.5 * np.mean(samples == 0)
    return float(min(1.0, 2 * min(below, 1 - below)))


def paired_bootstrap(a: Mapping, b: Mapping, tasks=None, iters: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Accuracy of ``a`` minus ``b`` per task and over the tasks' average (each task weighs
    1/len(tasks), as in the paper's Avg.), resampling documents within each task.

    Returns ``{"tasks": {task: {...}}, "avg": {...}}`` where each entry has ``diff`` (observed,
    fraction), ``lo``/``hi`` (percentile interval at ``level``), ``p`` (two-sided) and ``docs``."""
    pairs = _paired(a, b, tasks)
    rng = np.random.default_rng(seed)
    per_task, resampled = {}, []
    for task, (x, y) in pairs.items():
        d = x - y
        w = _weights(rng, len(d), iters)
        boot = w @ d / len(d)
        resampled.append(boot)
        lo, hi = _interval(boot, level)
        per_task[task] = {"diff": float(d.mean()), "lo": lo, "hi": hi, "p": _two_sided_p(boot), "docs": len(d)}
    boot_avg = np.mean(resampled, axis=0)
    lo, hi = _interval(boot_avg, level)
    avg = {"diff": float(np.mean([v["diff"] for v in per_task.values()])), "lo": lo, "hi": hi,
           "p": _two_sided_p(boot_avg), "docs": int(sum(v["docs"] for v in per_task.values()))}
    return {"tasks": per_task, "avg": avg, "iters": iters, "level": level}


def compare(a: Mapping, b: Mapping, tasks=None, iters: int = 10000, seed: int = 0) -> dict:
    """Both tests at once: ``paired_bootstrap`` and, under ``"mcnemar"``, the per-task exact test."""
    out = paired_bootstrap(a, b, tasks, iters, seed)
    out["mcnemar"] = mcnemar(a, b, tasks)
    return out


# ---------------------------------------------------------------------------------------
# Rank correlation with reference numbers, and the above-chance margin
# ---------------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties sharing their average rank (as Spearman's rho needs)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``x`` with ``y``; NaN for a constant row."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean()
    den = np.sqrt((xc ** 2).sum(axis=-1) * (yc ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=-1) / np.where(den > 0, den, 1), np.nan)


def spearman(x, y) -> float:
    """Spearman's rho of two sequences (ties at their average rank); NaN when one is constant."""
    return float(_pearson_rows(_ranks(np.asarray(x, dtype=float))[None], _ranks(np.asarray(y, dtype=float)))[0])


def spearman_bootstrap(models: Mapping[str, Mapping], reference: Mapping[str, float], tasks=PAPER_TASKS,
                       iters: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Spearman's rho between each model's average accuracy over ``tasks`` and ``reference``
    (e.g. the paper's Avg. per row), with a percentile interval from resampling documents.

    ``models``: ``{label: {task: {doc_id: 0/1}}}``; ``reference``: ``{label: number}``. Only
    labels in both count, and per task only the documents every such model was scored on; each
    resample draws the same documents for every model (paired), so the interval reflects how
    stable our ranking is at these document counts, not the reference's own uncertainty."""
    labels = [k for k in models if k in reference and math.isfinite(reference[k])]
    if len(labels) < 3:
        raise CompareError(f"a rank correlation needs at least 3 models with a reference number, got {labels}")
    ref = np.asarray([reference[k] for k in labels], dtype=float)
    rng = np.random.default_rng(seed)
    observed, boot = np.zeros(len(labels)), np.zeros((iters, len(labels)))
    docs = {}
    for task in tasks:
        per_model = [models[k].get(task) for k in labels]
        if any(p is None for p in per_model):
            raise CompareError(f"task {task!r} is missing for {[k for k, p in zip(labels, per_model) if p is None]}")
        if isinstance(per_model[0], Mapping):
            ids = sorted(set.intersection(*(set(p) for p in per_model)))
            mat = np.asarray([[p[i] for i in ids] for p in per_model], dtype=float)
        else:
            mat = np.asarray(per_model, dtype=float)
        if mat.shape[1] == 0:
            raise CompareError(f"{task}: the models share no scored document")
        docs[task] = mat.shape[1]
        observed += mat.mean(axis=1) / len(tasks)
        boot += _weights(rng, mat.shape[1], iters) @ mat.T / mat.shape[1] / len(tasks)
    ref_ranks = _ranks(ref)
    rho = float(_pearson_rows(_ranks(observed)[None], ref_ranks)[0])
    rhos = _pearson_rows(_ranks(boot), ref_ranks)
    rhos = rhos[np.isfinite(rhos)]
    lo, hi = _interval(rhos, level) if len(rhos) else (math.nan, math.nan)
    p_agree, p_reverse = rank_permutation_p(observed, ref, seed=seed)
    return {"rho": rho, "lo": lo, "hi": hi, "models": labels, "n": len(labels), "docs": docs,
            "iters": iters, "level": level, "p_agree": p_agree, "p_reverse": p_reverse}


def rank_permutation_p(x, y, seed: int = 0, draws: int = 200_000) -> tuple[float, float]:
    """How likely a rho at least as high (and at least as low) as Spearman's rho(x, y) is when the
    order of ``x`` is random: the chance a ranking agrees with a reference by luck, which the
    bootstrap over documents does not measure (with 3 models one ordering in 6 gives rho = 1).
    Exact over all orderings up to 8 models, else from ``draws`` random ones (seeded)."""
    import itertools

    rx, ry = _ranks(np.asarray(x, dtype=float)), _ranks(np.asarray(y, dtype=float))
    rho = float(_pearson_rows(rx[None], ry)[0])
    if len(rx) <= 8:
        perms = rx[np.asarray(list(itertools.permutations(range(len(rx)))))]
    else:
        rng = np.random.default_rng(seed)
        perms = np.stack([rng.permutation(rx) for _ in range(draws)])
    rhos = _pearson_rows(perms, ry)
    eps = 1e-12
    return float(np.mean(rhos >= rho - eps)), float(np.mean(rhos <= rho + eps))


def chance_average(tasks=PAPER_TASKS) -> float:
    return sum(CHANCE[t] for t in tasks) / len(tasks)


def above_chance_margin(student_avg: float, teacher_avg: float, tasks=PAPER_TASKS) -> float:
    """How much of the teacher's lead over chance the student keeps: 1 = the teacher's
    average, 0 = chance. Averages as fractions in [0, 1] over ``tasks``."""
    chance = chance_average(tasks)
    if teacher_avg <= chance:
        raise CompareError(f"the teacher's average {teacher_avg:.4f} is not above chance {chance:.4f}: "
                           "the margin is undefined")
    return (student_avg - chance) / (teacher_avg - chance)


def margin_bootstrap(student: Mapping, teacher: Mapping, tasks=PAPER_TASKS, iters: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """:func:`above_chance_margin` with a percentile interval from resampling documents (the
    same documents for student and teacher)."""
    pairs = _paired(student, teacher, tasks)
    rng = np.random.default_rng(seed)
    s_avg = t_avg = 0.0
    s_boot, t_boot = np.zeros(iters), np.zeros(iters)
    for x, y in pairs.values():
        w = _weights(rng, len(x), iters)
        s_avg += x.mean() / len(pairs)
        t_avg += y.mean() / len(pairs)
        s_boot += w @ x / len(x) / len(pairs)
        t_boot += w @ y / len(y) / len(pairs)
    chance = chance_average(list(pairs))
    margin = above_chance_margin(s_avg, t_avg, list(pairs))
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (s_boot - chance) / (t_boot - chance)
    boot = boot[np.isfinite(boot) & (t_boot > chance)]
    lo, hi = _interval(boot, level) if len(boot) else (math.nan, math.nan)
    return {"margin": margin, "lo": lo, "hi": hi, "student_avg": s_avg, "teacher_avg": t_avg, "chance": chance}


def format_p(p: float) -> str:
    return "<0.001" if p < 1e-3 else f"{p:.3f}"

