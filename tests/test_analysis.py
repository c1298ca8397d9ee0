"""The study page's JSON twin and paired analyses, on a synthetic outputs folder (no model).

Run folders and evaluation files are written in the formats linearize.stages and
linearize.evaluate write them, with per-document scores drawn at chosen accuracies; the page
and its twin are then checked against numbers recomputed here from those same documents."""
import json
import math

import numpy as np
import pytest
import yaml

from linearize import analysis as A
from linearize import compare as C
from linearize import results as R
from linearize import study

TASKS = list(R.TASKS)
N = 300
SKILL = {("gla", "kd"): 0.05, ("gla", "mm"): 0.0, ("xlstm", "kd"): 0.02, ("deltanet", "kd"): -0.08,
         ("retnet", "kd"): 0.0}


def _eval_file(folder, label, offset, rng):
    tasks = {}
    for t in TASKS:
        acc = (rng.random(N) < C.CHANCE[t] + 0.15 + offset).astype(float)
        p = acc.mean()
        tasks[t] = {"acc": p, "acc_stderr": math.sqrt(p * (1 - p) / (N - 1)), "n_docs": N,
                    "per_doc": {"doc_id": list(range(N)), "acc": acc.tolist()}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"eval_limit{N}.json").write_text(json.dumps({"model": label, "tasks": tasks, "limit": N,
                                                            "online": False}))
    return tasks


@pytest.fixture
def outputs(tmp_path):
    return _make_outputs(tmp_path, SKILL)


def _make_outputs(tmp_path, skill):
    rng = np.random.default_rng(0)
    out = tmp_path / "outputs"
    _eval_file(out / "teacher", "teacher: tiny", 0.1, rng)
    for (arch, variant), offset in skill.items():
        run = out / arch / f"cpu-study-{variant}"
        run.mkdir(parents=True)
        params = dict(arch=arch, run_name=run.name, preset="cpu-study", teacher="tiny", qkv_copy=False,
                      matrix_mixing=variant == "mm", h2h=False, distill=True)
        (run / "params.yaml").write_text(yaml.safe_dump(params))
        events = [{"event": "eval", "after": "stage3", "perplexity": 100.0 + offset, "kl": 1.5,
                   "teacher_perplexity": 40.0}]
        (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, events)))
        for stage in ([1, 3] if variant == "mm" else [3]):
            (run / f"stage{stage}").mkdir()
            (run / f"stage{stage}" / "done.json").write_text(json.dumps({"tokens": 1000 * stage, "wall_s": 60.0}))
        _eval_file(run, f"{arch}/{run.name}", offset, rng)
    return out


def test_page_twin_follows_the_schema_and_recomputes_from_the_documents(outputs, tmp_path):
    runs = study.find_runs(outputs)
    page = A.write_results_page(tmp_path / "docs" / "results.md", outputs, runs, {})
    record = R.read_results(page.with_suffix(".json"))
    assert record["teacher"]["name"] == "tiny" and record["teacher"]["ppl"] == 40.0
    gla_mm = next(r for r in record["runs"] if r["arch"] == "gla" and r["variant"] == "mm")
    assert gla_mm["tokens"] == 4000 and gla_mm["wall_s"] == 120.0 and gla_mm["kl"] == 1.5
    saved = json.loads((outputs / "gla" / "cpu-study-mm" / f"eval_limit{N}.json").read_text())
    for t in TASKS:
        assert gla_mm["tasks"][t] == {"acc": saved["tasks"][t]["acc"], "stderr": saved["tasks"][t]["acc_stderr"],
                                      "docs": N}
    text = page.read_text()
    se = saved["tasks"]["piqa"]["acc_stderr"]
    assert f"{100 * saved['tasks']['piqa']['acc']:.2f} ± {100 * se:.2f}" in text  # cells carry their stderr

    analysis = record["analysis"]
    # Spearman over the four kd rows + gla mm, against the paper's Avg.
    sp = analysis["spearman_table2"]
    docs = {r.paper_label: C.correctness(r.results) for r in runs}
    ours = [np.mean([np.mean(list(docs[k][t].values())) for t in TASKS]) for k in sp["models"]]
    from scipy.stats import spearmanr

    assert sp["rho"] == pytest.approx(spearmanr(ours, [study.paper_average(k) for k in sp["models"]]).statistic)
    assert sp["n"] == 5 and sp["lo"] <= sp["rho"] <= sp["hi"]
    assert f"**{sp['rho']:.2f}**" in text
    # one paired comparison: gla mm against gla kd, the average difference from the documents
    (pair,) = [p for p in analysis["pairs"] if p["arch"] == "gla"]
    a, b = docs["Llama-GLA + MM"], docs["Llama-GLA"]
    diff = np.mean([np.mean(list(a[t].values())) - np.mean(list(b[t].values())) for t in TASKS])
    assert pair["avg"]["diff"] == pytest.approx(diff)
    assert pair["paper_diff"] == pytest.approx((47.78 - 47.85) / 100)
    only_a = sum(1 for i in range(N) if a["piqa"][i] > b["piqa"][i])
    only_b = sum(1 for i in range(N) if a["piqa"][i] < b["piqa"][i])
    assert pair["mcnemar"]["piqa"]["p"] == pytest.approx(C.mcnemar_exact(only_a, only_b))
    # margins: each run's from its own documents and the teacher's
    teacher = json.loads((outputs / "teacher" / f"eval_limit{N}.json").read_text())
    t_avg = np.mean([teacher["tasks"][t]["acc"] for t in TASKS])
    g_avg = np.mean([gla_mm["tasks"][t]["acc"] for t in TASKS])
    assert analysis["margins"]["gla/cpu-study-mm"]["margin"] == pytest.approx(C.above_chance_margin(g_avg, t_avg))


def test_runs_without_per_document_results_are_named_not_compared(outputs, tmp_path):
    path = outputs / "xlstm" / "cpu-study-kd" / f"eval_limit{N}.json"
    res = json.loads(path.read_text())
    for m in res["tasks"].values():
        del m["per_doc"]
    path.write_text(json.dumps(res))
    runs = study.find_runs(outputs)
    page = A.write_results_page(tmp_path / "results.md", outputs, runs, {})
    record = R.read_results(page.with_suffix(".json"))
    assert record["analysis"]["without_per_doc"] == ["xlstm/cpu-study-kd"]
    assert "xlstm/cpu-study-kd" not in record["analysis"]["margins"]
    assert "`xlstm/cpu-study-kd`" in page.read_text()


def test_verdict_against_the_papers_difference():
    from linearize.analysis import verdict

    assert verdict({"lo": 0.01, "hi": 0.05}, 1.2) == "agrees with the paper"
    assert verdict({"lo": -0.05, "hi": -0.01}, 1.2) == "contradicts the paper"
    assert verdict({"lo": -0.01, "hi": 0.02}, 1.2).startswith("undecided")
    assert verdict({"lo": -0.05, "hi": -0.01}, -0.07) == "a < b; the paper: within 0.5 points"
    assert verdict({"lo": 0.01, "hi": 0.05}, float("nan")) == "a > b"


def test_students_are_ranked_per_column_and_findings_follow_the_intervals(outputs, tmp_path):
    runs = study.find_runs(outputs)
    page = A.write_results_page(tmp_path / "results.md", outputs, runs, {})
    record = R.read_results(page.with_suffix(".json"))
    kd = next(e for e in record["analysis"]["rankings"] if e["variant"] == "kd")
    # ranked by the six-task average recomputed here from the documents
    docs = {r.label: C.correctness(r.results) for r in runs}
    ours = {label: np.mean([np.mean(list(d[t].values())) for t in TASKS]) for label, d in docs.items()}
    expected = sorted((r.label for r in runs if r.variant == "kd"), key=lambda k: -ours[k])
    assert [x["run"] for x in kd["students"]] == expected
    assert [x["avg"] for x in kd["students"]] == pytest.approx([ours[k] for k in expected])
    from scipy.stats import spearmanr

    with_paper = [x for x in kd["students"] if x["paper_avg"] is not None]
    assert kd["spearman"]["rho"] == pytest.approx(
        spearmanr([x["avg"] for x in with_paper], [x["paper_avg"] for x in with_paper]).statistic)
    text = page.read_text()
    assert "## What holds here of the paper's findings" in text and "## Students ranked under `kd`" in text
    # each student lands in the finding's group its own paired interval puts it in
    line = next(s for s in text.splitlines() if s.startswith("- **matrix mixing (stage 1), no QKV copy**"))
    pair = next(p for p in record["analysis"]["pairs"] if p["question"].startswith("matrix mixing (stage 1)"))
    group = "better for gla" if pair["avg"]["lo"] > 0 else "worse for gla" if pair["avg"]["hi"] < 0 else "not separated for gla"
    assert group in line
    # the paper's side names its students by the same groups: gla's paper gap (47.78 - 47.85) is a tie
    assert "The paper (no intervals): better for none; worse for none; within 0.5 points for gla." in line
    # the direction of the ranking finding follows its interval, never "holds" when it covers 0
    sp = kd["spearman"]
    rank_line = next(s for s in text.splitlines() if s.startswith("- **The ranking of the mixers** (`kd`"))
    assert ("holds" in rank_line) == (sp["lo"] > 0 and sp["p_agree"] < 0.05)


def test_a_ranking_that_chance_explains_is_never_said_to_hold():
    # 3 students: rho = 1 for 1 ordering in 6, so p = 1/6 even with the documents' interval at 1
    assert C.rank_permutation_p([1, 2, 3], [10, 20, 30]) == pytest.approx((1 / 6, 1.0))
    sp = {"rho": 1.0, "lo": 1.0, "hi": 1.0, "n": 3, "p_agree": 1 / 6, "p_reverse": 1.0}
    assert A._direction(sp).startswith("is not determined yet")
    assert A._direction({**sp, "n": 5, "p_agree": 1 / 120}).startswith("holds")
    assert A._direction({**sp, "rho": -1.0, "lo": -1.0, "hi": -1.0, "n": 5, "p_agree": 1.0,
                         "p_reverse": 1 / 120}).startswith("is reversed")
    # against scipy's exact null for 5 models: P(rho >= 0.9) = 5 / 120 (ties of rank sums)
    p, _ = C.rank_permutation_p([1, 2, 3, 5, 4], [1, 2, 3, 4, 5])
    assert p == pytest.approx(5 / 120)


def test_the_ranking_is_also_given_without_the_softmax_student(tmp_path):
    """The softmax student tops both rankings by construction: the page also gives rho over the
    subquadratic students alone (here the kd column's four linear students)."""
    out = _make_outputs(tmp_path, {**SKILL, ("softmax", "kd"): 0.3})
    runs = study.find_runs(out)
    page = A.write_results_page(tmp_path / "results.md", out, runs, {})
    record = R.read_results(page.with_suffix(".json"))
    kd = next(e for e in record["analysis"]["rankings"] if e["variant"] == "kd")
    linear = [x for x in kd["students"] if x["arch"] != "softmax" and x["paper_avg"] is not None]
    assert kd["spearman"]["n"] == len(linear) + 1 and kd["spearman_subquadratic"]["n"] == len(linear) >= 3
    from scipy.stats import spearmanr

    assert kd["spearman_subquadratic"]["rho"] == pytest.approx(
        spearmanr([x["avg"] for x in linear], [x["paper_avg"] for x in linear]).statistic)
    line = next(s for s in page.read_text().splitlines() if s.startswith("- **The ranking of the mixers** (`kd`"))
    assert "subquadratic students alone" in line
    # where the softmax student really stands: here its average is set low, in the paper it leads
    ours = 1 + sum(x["avg"] > next(y["avg"] for y in kd["students"] if y["arch"] == "softmax")
                   for x in kd["students"] if x["paper_avg"] is not None)
    if ours == 1:
        assert "(the softmax student, first in both rankings, left out)" in line
    else:
        assert f"of {len(linear) + 1} here, 1st in the paper, left out)" in line and "first in both" not in line


def test_a_run_in_progress_is_marked_so_its_early_perplexity_is_not_read_as_final(outputs, tmp_path):
    # a grid cell whose stage 3 has not finished: only the conversion point, no evaluation yet
    run = outputs / "rebased" / "cpu-study-kd"
    run.mkdir(parents=True)
    (run / "params.yaml").write_text(yaml.safe_dump(dict(arch="rebased", run_name=run.name, preset="cpu-study",
                                                         teacher="tiny", qkv_copy=False, matrix_mixing=False,
                                                         h2h=False, distill=True)))
    (run / "metrics.jsonl").write_text(json.dumps({"event": "eval", "after": "conversion", "perplexity": 3e4,
                                                   "kl": 7.3, "teacher_perplexity": 40.0}))
    page = A.write_results_page(tmp_path / "docs" / "results.md", outputs, study.find_runs(outputs), {})
    runs = {(r["arch"], r["variant"]): r for r in R.read_results(page.with_suffix(".json"))["runs"]}
    assert runs[("rebased", "kd")]["evaluated"] is False and runs[("rebased", "kd")]["ppl_after"] == "conversion"
    assert runs[("rebased", "kd")]["tasks"] == {}
    assert runs[("gla", "kd")]["evaluated"] is True and runs[("gla", "kd")]["ppl_after"] == "stage3"
