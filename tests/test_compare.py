"""Paired comparisons against hand-computed values, scipy, and the normal approximation."""
import math

import numpy as np
import pytest

from linearize import compare as C

TASKS = list(C.CHANCE)


def test_mcnemar_exact_matches_hand_computed_values():
    # b=1, c=9: 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert C.mcnemar_exact(1, 9) == pytest.approx(22 / 1024, rel=1e-12)
    assert C.mcnemar_exact(9, 1) == pytest.approx(22 / 1024, rel=1e-12)
    # b=0, c=5: 2 / 32
    assert C.mcnemar_exact(0, 5) == pytest.approx(1 / 16, rel=1e-12)
    assert C.mcnemar_exact(5, 5) == 1.0  # capped: the observed split is the most likely one
    assert C.mcnemar_exact(0, 0) == 1.0


def test_mcnemar_exact_matches_scipy_binomtest():
    from scipy.stats import binomtest

    for b, c in [(3, 17), (40, 61), (120, 80), (7, 7), (0, 30), (250, 300)]:
        assert C.mcnemar_exact(b, c) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_counts_discordant_documents_by_id():
    a = {"piqa": {0: 1, 1: 1, 2: 0, 3: 0, 4: 1}}
    b = {"piqa": {0: 1, 1: 0, 2: 1, 3: 1, 4: 1, 99: 0}}  # doc 99 only in b: not compared
    out = C.mcnemar(a, b)["piqa"]
    assert (out["docs"], out["only_a"], out["only_b"]) == (5, 1, 2)
    assert out["p"] == pytest.approx(C.mcnemar_exact(1, 2))


def test_paired_bootstrap_identical_models_and_certain_difference():
    rng = np.random.default_rng(1)
    x = {t: rng.integers(0, 2, 200).tolist() for t in TASKS}
    same = C.paired_bootstrap(x, x, iters=500)
    assert same["avg"]["diff"] == 0 and same["avg"]["lo"] == 0 and same["avg"]["hi"] == 0
    assert same["avg"]["p"] == 1.0
    ones = {t: [1] * 200 for t in TASKS}
    zeros = {t: [0] * 200 for t in TASKS}
    out = C.paired_bootstrap(ones, zeros, iters=500)
    assert out["avg"]["diff"] == 1.0 and out["avg"]["p"] == 0.0 and out["avg"]["lo"] == 1.0


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    # per-document differences d in {-1, 0, 1}: the bootstrap standard error of the mean is
    # sd(d)/sqrt(n) (population sd), so the 95% interval is about mean +- 1.96 * that.
    rng = np.random.default_rng(2)
    n = 2000
    a = rng.random(n) < 0.55
    b = np.where(rng.random(n) < 0.7, a, rng.random(n) < 0.45)  # correlated with a
    d = a.astype(float) - b.astype(float)
    out = C.paired_bootstrap({"piqa": a.tolist()}, {"piqa": b.tolist()}, iters=20000)["tasks"]["piqa"]
    half = 1.959964 * d.std() / math.sqrt(n)
    assert out["diff"] == pytest.approx(d.mean())
    assert out["lo"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert out["hi"] == pytest.approx(d.mean() + half, abs=0.15 * half)
    # and its p-value is close to the normal test's two-sided p
    from scipy.stats import norm

    z = d.mean() / (d.std() / math.sqrt(n))
    assert out["p"] == pytest.approx(2 * norm.sf(abs(z)), abs=0.02)


def test_paired_bootstrap_average_is_the_mean_of_the_task_differences():
    a = {"piqa": [1, 1, 1, 0], "winogrande": [1, 0, 0, 0]}
    b = {"piqa": [0, 1, 0, 0], "winogrande": [1, 1, 0, 0]}
    out = C.paired_bootstrap(a, b, iters=200)
    assert out["tasks"]["piqa"]["diff"] == pytest.approx(0.5)
    assert out["tasks"]["winogrande"]["diff"] == pytest.approx(-0.25)
    assert out["avg"]["diff"] == pytest.approx(0.125)
    assert out["avg"]["docs"] == 8


def test_unequal_sequences_are_refused():
    with pytest.raises(C.CompareError, match="doc_id"):
        C.paired_bootstrap({"piqa": [1, 0]}, {"piqa": [1]})


def test_spearman_matches_scipy_and_bootstrap_interval_contains_it():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    skill = {"m1": 0.30, "m2": 0.40, "m3": 0.45, "m4": 0.60, "m5": 0.62}
    models = {k: {t: (rng.random(500) < p).astype(int).tolist() for t in TASKS} for k, p in skill.items()}
    reference = {"m1": 40.0, "m2": 41.0, "m3": 47.0, "m4": 46.0, "m5": 50.0, "absent": 10.0}
    out = C.spearman_bootstrap(models, reference, TASKS, iters=1000)
    ours = [np.mean([np.mean(models[k][t]) for t in TASKS]) for k in out["models"]]
    assert out["rho"] == pytest.approx(spearmanr(ours, [reference[k] for k in out["models"]]).statistic)
    assert out["lo"] <= out["rho"] <= out["hi"]
    assert out["n"] == 5 and "absent" not in out["models"]


def test_spearman_of_a_reversed_clear_ranking_is_minus_one_with_a_tight_interval():
    models = {f"m{i}": {t: [1] * (100 * i) + [0] * (500 - 100 * i) for t in TASKS} for i in range(1, 5)}
    reference = {f"m{i}": -float(i) for i in range(1, 5)}
    out = C.spearman_bootstrap(models, reference, TASKS, iters=300)
    assert out["rho"] == pytest.approx(-1.0)
    assert out["hi"] == pytest.approx(-1.0)


def test_above_chance_margin_hand_computed():
    chance = (0 + 0.5 + 0.25 + 0.25 + 0.5 + 0.25) / 6
    assert C.chance_average() == pytest.approx(chance)
    assert C.above_chance_margin(0.50, 0.60) == pytest.approx((0.50 - chance) / (0.60 - chance))
    assert C.above_chance_margin(chance, 0.60) == pytest.approx(0.0)
    with pytest.raises(C.CompareError, match="not above chance"):
        C.above_chance_margin(0.5, 0.2)


def test_margin_bootstrap_observed_value_and_interval():
    rng = np.random.default_rng(4)
    teacher = {t: (rng.random(500) < C.CHANCE[t] + 0.2).astype(int).tolist() for t in TASKS}
    student = {t: (rng.random(500) < C.CHANCE[t] + 0.1).astype(int).tolist() for t in TASKS}
    out = C.margin_bootstrap(student, teacher, TASKS, iters=1000)
    s = np.mean([np.mean(student[t]) for t in TASKS])
    t = np.mean([np.mean(teacher[t]) for t in TASKS])
    assert out["margin"] == pytest.approx(C.above_chance_margin(s, t))
    assert out["lo"] < out["margin"] < out["hi"]


def test_correctness_reads_per_document_results_and_names_the_fix():
    res = {"model": "m", "tasks": {"piqa": {"acc": 0.5, "per_doc": {"doc_id": [2, 0], "acc": [1.0, 0.0]}}}}
    assert C.correctness(res) == {"piqa": {2: 1.0, 0: 0.0}}
    with pytest.raises(C.CompareError, match="per_doc=True"):
        C.correctness({"model": "m", "tasks": {"piqa": {"acc": 0.5}}})
