"""benchmarks/recipe.py's report data: a run's curve from its metrics (tokens and wall time summed
over the stages in the order they ran, points inside a stage not double-counted), its six-task
record and margin, and the study grid's recipe cells joining the page (--grid-root)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["lambada_openai", "winogrande", "arc_easy", "arc_challenge", "piqa", "hellaswag"]


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("recipe_bench", ROOT / "benchmarks" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval_file(path: Path, accs: dict) -> None:
    """An evaluate_tasks-shaped result on 4 documents a task (per-document accuracies given)."""
    tasks = {t: {"acc": sum(a) / len(a), "acc_stderr": 0.1, "n_docs": len(a), "n_docs_total": 100,
                 "per_doc": {"doc_id": list(range(len(a))), "acc": a}} for t, a in accs.items()}
    path.write_text(json.dumps({"tasks": tasks, "limit": 4}))


def _grid_run(folder: Path, arch: str) -> None:
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(
        {"arch": arch, "corpus": "mix", "attention_transfer": True, "distill": True,
         "matrix_mixing": False, "h2h": False}))
    records = [
        {"event": "readout_fit", "tokens": 8192, "wall_s": 50.0},
        {"event": "eval", "after": "conversion", "tokens": 0, "stage_wall_s": 0.0, "perplexity": 240.0,
         "teacher_perplexity": 30.0, "kl": 2.3},
        {"event": "eval", "after": "stage0@32768", "tokens": 32768, "stage_wall_s": 300.0, "perplexity": 120.0,
         "teacher_perplexity": 30.0, "kl": 1.7},
        {"event": "eval", "after": "stage0", "tokens": 65536, "stage_wall_s": 600.0, "perplexity": 90.0,
         "teacher_perplexity": 30.0, "kl": 1.4},
        {"event": "eval", "after": "stage3", "tokens": 16384, "stage_wall_s": 400.0, "perplexity": 60.0,
         "teacher_perplexity": 30.0, "kl": 1.2},
    ]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for stage in (0, 3):
        (folder / f"stage{stage}").mkdir()
        (folder / f"stage{stage}" / "done.json").write_text("{}")


def test_grid_cells_join_the_recipe_page_with_their_tasks(recipe, tmp_path):
    outputs, grid = tmp_path / "outputs", tmp_path / "results" / "cpu-grid"
    (outputs / "teacher-recipe").mkdir(parents=True)
    teacher = {t: [1.0, 1.0, 0.0, 1.0] for t in TASKS}  # 75% everywhere
    _eval_file(recipe._eval_path(outputs / "teacher-recipe", 4), teacher)
    _grid_run(grid / "xlstm" / recipe.GRID_RUN, "xlstm")
    _grid_run(grid / "retnet" / recipe.GRID_RUN, "retnet")  # not one of the page's three students
    student = {t: [1.0, 0.0, 0.0, 1.0] for t in TASKS}  # 50% everywhere
    _eval_file(grid / "xlstm" / recipe.GRID_RUN / "eval_limit4.json", student)  # the runner's file name

    data = recipe.collect(outputs, 4, grid)
    assert [(r["arch"], r["variant"]) for r in data["runs"]] == [("xlstm", "grid")]
    run = data["runs"][0]
    assert run["finished"] and run["tokens"] == 65536 + 16384
    assert run["wall_s"] == pytest.approx(50 + 600 + 400)  # the mid-stage point is not added again
    assert [p["tokens"] for p in run["curve"]] == [0, 32768, 65536, 81920]
    assert run["ppl"] == 60.0 and run["kl"] == 1.2 and run["teacher_ppl"] == 30.0
    assert run["tasks"]["piqa"]["acc"] == 0.5 and run["tasks"]["piqa"]["docs"] == 4
    # chance: 0 for LAMBADA, 0.5 for WinoGrande and PIQA, 0.25 for the rest
    chance = (0 + 0.5 + 0.25 + 0.25 + 0.5 + 0.25) / 6
    assert run["margin"] == pytest.approx((0.5 - chance) / (0.75 - chance))
    assert recipe.collect(outputs, 4)["runs"] == []  # without --grid-root only recipe-* folders count


def test_report_keeps_the_runs_whose_folders_are_gone(recipe, tmp_path):
    """A machine that lost outputs/ (the run folders are git-ignored) regenerates the page without
    losing its runs: the previous twin's records come back marked carried, the teacher's tasks
    with them (so a new run's margin is still measured), and a run present here replaces the
    carried one of the same arch and variant."""
    outputs, grid = tmp_path / "outputs", tmp_path / "results" / "cpu-grid"
    _grid_run(grid / "xlstm" / recipe.GRID_RUN, "xlstm")
    _eval_file(grid / "xlstm" / recipe.GRID_RUN / "eval_limit4.json", {t: [1.0, 0.0, 0.0, 1.0] for t in TASKS})
    teacher_tasks = {t: {"acc": 0.75, "stderr": 0.2, "docs": 4} for t in TASKS}
    old = {"arch": "deltanet", "variant": "at", "hybrid": False, "tokens": 1, "wall_s": 1.0, "ppl": 50.0,
           "kl": 0.7, "tasks": {}, "finished": True, "curve": []}
    previous = {"teacher": {"name": "t", "ppl": 42.0, "tasks": teacher_tasks}, "teacher_lambada_ppl": 55.0,
                "runs": [old, dict(old, arch="xlstm", variant="grid", ppl=999.0),
                         dict(old, variant="half", finished=False)]}
    data = recipe.collect(outputs, 4, grid, carry=previous)
    runs = {(r["arch"], r["variant"]): r for r in data["runs"]}
    assert set(runs) == {("deltanet", "at"), ("xlstm", "grid")}
    assert runs[("deltanet", "at")]["carried"] is True and runs[("deltanet", "at")]["ppl"] == 50.0
    assert not runs[("xlstm", "grid")].get("carried") and runs[("xlstm", "grid")]["ppl"] == 60.0
    # the grid cell's margin against the carried teacher: (0.5 - chance) / (0.75 - chance) per task
    chance = {"lambada_openai": 0.0, "winogrande": 0.5, "piqa": 0.5}
    avg = lambda acc: sum(acc - chance.get(t, 0.25) for t in TASKS) / len(TASKS)  # noqa: E731
    assert runs[("xlstm", "grid")]["margin"] == pytest.approx(avg(0.5) / avg(0.75))
    assert data["teacher"]["ppl"] == 42.0 and data["teacher_lambada_ppl"] == 55.0
    assert all("carried" not in r for r in recipe.collect(outputs, 4, grid)["runs"])


def test_a_hybrid_is_paired_with_the_window_alone(recipe, tmp_path):
    """vs_window: the hybrid's six-task average minus the window control's on the same documents
    (here +1 document of 4 on every task: +25 points), with a bootstrap interval around it."""
    outputs = tmp_path / "outputs"
    control = outputs / "gla" / f"recipe-{recipe.CONTROL}"
    hybrid = outputs / "xlstm" / "recipe-mix-at-w64"
    for folder, accs, window in ((control, [1.0, 0.0, 0.0, 1.0], 64), (hybrid, [1.0, 1.0, 0.0, 1.0], 64)):
        _grid_run(folder, folder.parent.name)
        params = yaml.safe_load((folder / "params.yaml").read_text())
        (folder / "params.yaml").write_text(yaml.safe_dump({**params, "hybrid_window": window}))
        _eval_file(recipe._eval_path(folder, 4), {t: accs for t in TASKS})
    data = recipe.collect(outputs, 4)
    runs = {r["variant"]: r for r in data["runs"]}
    got = runs["mix-at-w64"]["vs_window"]
    assert got["diff"] == pytest.approx(0.25) and got["lo"] <= 0.25 <= got["hi"] and got["docs"] == 24
    assert "vs_window" not in runs[recipe.CONTROL]


def test_a_pure_run_is_paired_with_the_grid_cell_of_its_student(recipe, tmp_path):
    """vs_grid: a pure run's six-task average minus the grid's recipe cell of the same student
    on the same documents (+1 document of 4 on every task: +25 points); hybrids and students
    without a grid cell get none."""
    from linearize.evaluate import results_path

    outputs, grid = tmp_path / "outputs", tmp_path / "results" / "cpu-grid"
    cell = grid / "gla" / recipe.GRID_RUN
    _grid_run(cell, "gla")
    _eval_file(results_path(cell, 4, online=False), {t: [1.0, 0.0, 0.0, 1.0] for t in TASKS})
    for arch, name, window in (("gla", "mix-gi-kd", None), ("gla", "mix-at-w64", 64), ("deltanet", "mix-at", None)):
        folder = outputs / arch / f"recipe-{name}"
        _grid_run(folder, arch)
        if window:
            params = yaml.safe_load((folder / "params.yaml").read_text())
            (folder / "params.yaml").write_text(yaml.safe_dump({**params, "hybrid_window": window}))
        _eval_file(recipe._eval_path(folder, 4), {t: [1.0, 1.0, 0.0, 1.0] for t in TASKS})
    runs = {r["variant"]: r for r in recipe.collect(outputs, 4, grid)["runs"]}
    got = runs["mix-gi-kd"]["vs_grid"]
    assert got["diff"] == pytest.approx(0.25) and got["lo"] <= 0.25 <= got["hi"] and got["docs"] == 24
    assert "vs_grid" not in runs["mix-at-w64"] and "vs_grid" not in runs["mix-at"]
    assert "vs_grid" not in runs["grid"]


def test_precision_pairs_put_each_bf16_run_beside_its_float32_control(recipe):
    """A `NAME-bf16` run is said beside `NAME` of the same student, point by point at equal
    tokens; a bf16 run without its control, or another student's control, says nothing."""
    def run(arch, variant, kls, wall):
        curve = [{"after": a, "tokens": t, "ppl": 60.0 + k, "teacher_ppl": 30.0, "kl": k}
                 for (a, t), k in zip((("conversion", 0), ("stage0", 32768), ("stage3", 49152)), kls)]
        return {"arch": arch, "variant": variant, "curve": curve, "wall_s": wall}

    runs = [run("deltanet", "mix-at32-kd", [7.0, 1.8, 1.5], 1200.0),
            run("deltanet", "mix-at32-kd-bf16", [7.0, 1.9, 1.6], 900.0),
            run("gla", "mix-at32-kd-bf16", [7.0, 2.0, 1.7], 800.0)]
    text = " ".join(recipe._precision_pairs(runs, 30.0))
    assert "deltanet / `mix-at32-kd-bf16` against its float32 control `mix-at32-kd`" in text
    assert "stage0 32K: 2.06x vs 2.06x, KL 1.900 vs 1.800" in text and "stage3 48K" in text
    assert "15.0 against 20.0 min" in text and "gla" not in text


def test_teacher_text_runs_are_compared_with_the_same_recipe_on_the_mix(recipe):
    """A `gen-NAME` run (train_corpus teacher-text) is said beside `mix-NAME` of the same student at
    equal tokens, in and out of domain, with the generation's share of its wall time; a gen run
    whose control is missing, or one not trained on teacher text, says nothing."""
    def run(arch, variant, kls, wall, **extra):
        curve = [{"after": a, "tokens": t, "ppl": 60.0 + k, "teacher_ppl": 30.0, "kl": k,
                  "ood_ppl": 90.0, "ood_teacher_ppl": 30.0, "ood_kl": k + 0.5}
                 for (a, t), k in zip((("conversion", 0), ("stage0", 32768), ("stage3", 49152)), kls)]
        return {"arch": arch, "variant": variant, "curve": curve, "wall_s": wall, **extra}

    gen = {"tokens": 75780, "documents": 320, "wall_s": 600.0, "prompt_tokens": 16}
    runs = [run("deltanet", "mix-at32-kd-bf16", [3.0, 1.8, 1.6], 600.0),
            run("deltanet", "gen-at32-kd-bf16", [2.0, 1.9, 1.4], 1200.0, train_corpus="teacher-text", teacher_text=gen),
            run("gla", "gen-at32-kd-bf16", [2.0, 1.9, 1.4], 1200.0, train_corpus="teacher-text", teacher_text=gen),
            run("deltanet", "gen-other", [2.0, 1.9, 1.4], 1200.0)]
    text = " ".join(recipe._teacher_text_pairs(runs, 30.0))
    assert "deltanet / `gen-at32-kd-bf16` against `mix-at32-kd-bf16`" in text and "gla" not in text
    assert "stage0 32K: 2.06x / 1.900 vs 2.06x / 1.800 (3.00x / 2.400 vs 3.00x / 2.300)" in text
    assert "20.0 min, of which 10.0 generating the text, against 10.0 min" in text
    assert "KL 2.000 against 3.000" in text and "the KL is lower (1.400 against 1.600)" in text
    assert "gen-other" not in text and "75,780 tokens" in text


def test_fit_spread_runs_are_compared_with_the_fit_on_the_first_blocks(recipe):
    def run(arch, variant, kls):
        curve = [{"after": a, "tokens": t, "ppl": 60.0 + k, "teacher_ppl": 30.0, "kl": k}
                 for (a, t), k in zip((("conversion", 0), ("stage3", 49152)), kls)]
        return {"arch": arch, "variant": variant, "curve": curve, "wall_s": 60.0}

    runs = [run("deltanet", "mix-at32-kd-bf16", [3.0, 1.6]), run("deltanet", "spread-at32-kd-bf16", [2.0, 1.5]),
            run("gla", "spread-at32-kd-bf16", [2.0, 1.5])]
    text = " ".join(recipe._fit_spread_pairs(runs, 30.0))
    assert "deltanet / `spread-at32-kd-bf16` against `mix-at32-kd-bf16`" in text and "gla" not in text
    assert "conversion 0K: 2.07x / 2.000 vs 2.10x / 3.000; stage3 48K: 2.05x / 1.500 vs 2.05x / 1.600." in text
    assert "(out of domain in brackets)" in text  # and none here: these curves logged no OOD point


def test_longer_block_runs_are_compared_only_where_blocks_match(recipe):
    """A run trained on 512-token blocks is set beside its 128-token twin at 512 tokens only, and
    its own-block KL never enters the window control's training-context comparison."""
    def run(variant, kl, long_val, long_ood, seq):
        return {"arch": "gla", "variant": variant, "kl": kl, "seq_len": seq, "hybrid": True,
                "long_val": {"val": {"kl": long_val, "ppl": 2.0, "teacher_ppl": 1.8},
                             "ood": {"kl": long_ood, "ppl": 2.0, "teacher_ppl": 1.8}}}

    twin, longer = run("mix-at-w64-gate", 0.020, 0.143, 0.154, 128), run("mix-at-w64-gate-s512", 0.106, 0.147, 0.251, 512)
    text = " ".join(recipe._longer_block_pairs([twin, longer]))
    assert "KL 0.147 against 0.143 on the run's corpus, 0.251 against 0.154 out of domain" in text
    assert "did not bring the KL at 512 tokens down" in text
    control = run("window-w64", 0.017, 0.159, 0.16, 128)
    words = recipe._against_window_words(control, [twin, longer])
    assert "(0.020-0.020 against 0.017)" in words and "0.106" not in words


def test_every_recipe_resolves_to_valid_params(recipe):
    """A recipe whose overrides name an unknown key or break a rule (warmup + decay, a window with
    no linear branch...) fails here, on the laptop, instead of minutes into a two-hour run."""
    for name in recipe.RECIPES:
        params = recipe.resolve("deltanet", name)
        assert params["run_name"] == f"recipe-{name}"
        for key, value in recipe.RECIPES[name][0].items():
            assert params[key] == value, (name, key)


def test_an_unknown_recipe_names_the_known_ones(recipe):
    with pytest.raises(SystemExit, match="choose from at, "):
        recipe.resolve("deltanet", "no-such-recipe")
