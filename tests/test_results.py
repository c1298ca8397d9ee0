"""The results schema: records, validation, the JSON twin and the markdown page."""
import json
import math

import pytest

from linearize import results as R

TASKS = list(R.TASKS)


def _tasks(acc=0.5, se=0.02, docs=500):
    return {t: R.task_record(acc, se, docs) for t in TASKS}


def test_write_then_read_round_trips_and_page_shows_stderr(tmp_path):
    teacher = R.teacher_record("smollm2", 49.5, _tasks(0.6, 0.02))
    runs = [R.run_record("gla", "kd", False, 1_000_000, 3600.0, 120.0, 1.5, _tasks(0.45, 0.022), run="gla/x"),
            R.run_record("xlstm", "mm", False, None, None, float("nan"), None, {})]
    rec = R.write_results(tmp_path / "r.md", tmp_path / "r.json", teacher, runs, title="T", intro="hello")
    back = R.read_results(tmp_path / "r.json")
    assert back == json.loads(json.dumps(rec))
    assert back["runs"][0]["run"] == "gla/x" and back["runs"][1]["ppl"] is None  # NaN -> null
    page = (tmp_path / "r.md").read_text()
    assert "45.0 ± 2.2" in page and "hello" in page
    # the student keeps (0.45 - chance) / (0.6 - chance) of the teacher's lead over chance
    chance = 1.75 / 6
    assert f"{(0.45 - chance) / (0.6 - chance):.2f}" in page


def test_average_and_its_stderr_hand_computed():
    tasks = {t: R.task_record(acc, se, 100) for t, acc, se in zip(TASKS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                                                                  [0.01, 0.02, 0.02, 0.01, 0.03, 0.01])}
    acc, se = R.average(tasks)
    assert acc == pytest.approx(0.35)
    assert se == pytest.approx(math.sqrt(0.0001 + 0.0004 + 0.0004 + 0.0001 + 0.0009 + 0.0001) / 6)
    del tasks["piqa"]
    assert all(math.isnan(v) for v in R.average(tasks))


@pytest.mark.parametrize("bad, match", [
    ({"teacher": {"name": "t", "ppl": 1.0, "tasks": {"piqa": {"acc": 55.0, "stderr": 1, "docs": 5}}}, "runs": []},
     "percent"),
    ({"teacher": {"name": "t", "ppl": 1.0, "tasks": {"mmlu": {"acc": 0.5, "stderr": 0.1, "docs": 5}}}, "runs": []},
     "unknown task"),
    ({"teacher": {"name": "t", "ppl": 1.0, "tasks": {}}, "runs": [{"arch": "gla"}]}, "lacks"),
    ({"teacher": {"name": "t", "tasks": {}}, "runs": []}, "ppl"),
])
def test_validation_names_the_field(bad, match):
    with pytest.raises(R.SchemaError, match=match):
        R.validate(bad)


def test_tasks_from_an_evaluate_result():
    res = {"model": "m", "limit": 500, "tasks": {
        "piqa": {"acc": 0.6, "acc_stderr": 0.02, "acc_norm": 0.62, "acc_norm_stderr": 0.021, "n_docs": 500},
        "lambada_openai": {"acc": 0.3, "acc_stderr": 0.03, "perplexity": 20.0, "n_docs": 500}}}
    assert R.tasks_from_eval(res) == {"piqa": R.task_record(0.6, 0.02, 500),
                                      "lambada_openai": R.task_record(0.3, 0.03, 500)}
    # acc_norm where defined, LAMBADA's acc otherwise
    assert R.tasks_from_eval(res, "acc_norm")["piqa"]["acc"] == 0.62
    assert R.tasks_from_eval(res, "acc_norm")["lambada_openai"]["acc"] == 0.3


def test_missing_stderr_is_lm_evals_sample_formula():
    # lm-eval without bootstrap leaves acc_stderr out; its mean_stderr of 0/1 scores is
    # stdev(ddof=1) / sqrt(n)
    import statistics

    scores = [1, 0, 0, 1, 1, 1, 0, 1]
    res = {"model": "m", "tasks": {"piqa": {"acc": sum(scores) / 8, "n_docs": 8}}}
    expected = statistics.stdev(scores) / math.sqrt(8)
    assert R.tasks_from_eval(res)["piqa"]["stderr"] == pytest.approx(expected)
