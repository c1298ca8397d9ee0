"""The study notebook and linearize.study, on the outputs of a real tiny run.

The module fixture runs the real steps in a temporary outputs folder: a tiny random Llama
teacher (the embedded tokenizer, saved with save_pretrained), ``stages.run_pipeline`` for two
students x two variants, ``evaluate`` on one task (limit 4) for the teacher and three of the
four runs (the fourth stays unevaluated, so its cells must read '-'), and ``bench.run`` in
process at two lengths. The tables are then checked against the files those steps wrote,
05_study executes under papermill on that folder, with extra cells that drive the explorer's
widget in its kernel (the PNG bytes its two ipywidgets.Image widgets hold after each control change).
"""
import hashlib
import inspect
import json
import math
import re
from pathlib import Path

import pytest
import torch

from linearize import study
from linearize.paths import ROOT

ARCHS = ("gla", "deltanet")
VARIANTS = ("kd", "qkv-mm-h2h")
UNEVALUATED = "deltanet/cpu-quick-qkv-mm-h2h"
TEXTS = ["The capital of France is Paris, and the capital of Italy is Rome.",
         "Tonight I report to the Congress on the state of our Union."]


def _tiny_teacher(folder: Path, hidden=64, layers=2, heads=4, kv_heads=2):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from linearize.teacher import resolve_teacher

    tok = AutoTokenizer.from_pretrained(resolve_teacher(None))  # the embedded tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def _corpus(folder: Path) -> Path:
    """Real English-and-code text that does not change: sources of standard-library modules."""
    import argparse, calendar, csv, difflib, fractions, getopt, gettext, glob, heapq, imaplib, json as js, \
        optparse, pathlib, pprint, shlex, statistics, string, tarfile, textwrap, zipfile  # noqa: E401

    mods = [argparse, calendar, csv, difflib, fractions, getopt, gettext, glob, heapq, imaplib, js, optparse,
            pathlib, pprint, shlex, statistics, string, tarfile, textwrap, zipfile]
    folder.mkdir(parents=True)
    path = folder / "stdlib.jsonl"
    path.write_text("\n".join(json.dumps({"text": inspect.getsource(m)[:20_000]}) for m in mods))
    return path


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from linearize import bench
    from linearize import evaluate as E
    from linearize import params as P
    from linearize import stages as S
    from linearize.runner import VARIANTS as GRID

    root = tmp_path_factory.mktemp("study")
    teacher_dir = root / "tiny-teacher"
    _tiny_teacher(teacher_dir)
    corpus = _corpus(root / "corpus")
    outputs = root / "outputs"
    for arch in ARCHS:
        for variant in VARIANTS:
            params = P.resolve(arch, "cpu-quick", dict(
                teacher=str(teacher_dir), corpus=str(corpus), seq_len=32, batch_size=2, stage1_tokens=128,
                stage2_tokens=128, stage3_tokens=128, val_blocks=2, val_batch_size=2, val_fraction=0.25,
                run_name=f"cpu-quick-{variant}", measure_teacher_throughput=False, **GRID[variant]))
            S.run_pipeline(params, root=outputs, progress=False)
    for folder in [None, *sorted(outputs.glob("*/cpu-quick-*"))]:
        if folder is not None and f"{folder.parent.name}/{folder.name}" == UNEVALUATED:
            continue
        model, tok, label = E.load_model(folder or teacher_dir)
        E.evaluate_tasks(model, tok, tasks=["arc_easy"], limit=4, output_dir=folder or outputs / "teacher",
                         label=label, bootstrap_iters=0)
    # notebook 03 also leaves eval_perplexity_kl.json beside the results: not zero-shot results
    from linearize.data import token_blocks

    model, tok, _ = E.load_model(outputs / "gla" / "cpu-quick-kd")
    teacher, _ = E.load_model(teacher_dir)[:2]
    blocks = token_blocks(tok, str(corpus), seq_len=32, split="validation", val_fraction=0.25, max_blocks=2)
    (outputs / "gla" / "cpu-quick-kd" / "eval_perplexity_kl.json").write_text(
        json.dumps(E.perplexity_and_kl(model, teacher, blocks)))
    bench.run(["teacher", *ARCHS], [16, 32], out=outputs / "bench" / "bench.csv", teacher=str(teacher_dir),
              steps=2, isolate=False, bandwidth_mib=16, log=lambda *_: None)
    return {"root": root, "outputs": outputs, "teacher": teacher_dir}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --- fast: no run needed --------------------------------------------------------------------
def test_variant_names_follow_the_runner_grid():
    from linearize.runner import VARIANTS as GRID

    for name, flags in GRID.items():
        assert study.variant_of(flags) == name


def test_the_fit_section_states_the_stage2_rate_that_ran(tmp_path):
    import yaml

    def fake_run(name, lr, flags):
        run = tmp_path / "deltanet" / name
        (run / "stage2").mkdir(parents=True)
        (run / "params.yaml").write_text(yaml.safe_dump({"arch": "deltanet", "stage2_lr": 0.5, **flags}))
        (run / "stage2" / "params.yaml").write_text(yaml.safe_dump({"stage2_lr": lr}))
        (run / "stage2" / "done.json").write_text("{}")
        return study.load_run(run)

    fit = dict(qkv_copy=True, readout_fit_tokens=64, matrix_mixing=True, h2h=True)
    runs = [fake_run("a", 1e-3, fit), fake_run("b", 1e-4, fit),
            fake_run("c", 7e-3, dict(fit, readout_fit_tokens=0))]  # no fit: not this section's
    assert study._fit_stage2_note(runs) == " `fit + MM + H2H` trained stage 2 at learning rate 0.0001, 0.001."
    assert study._fit_stage2_note(runs[2:]) == ""


def test_paper_average_reads_the_paper_rows():
    from linearize.evaluate import PAPER_ROWS

    assert study.paper_average("Llama-GLA + MM") == PAPER_ROWS["paper, SmolLM-360M teacher: Llama-GLA + MM"]["Avg."]
    assert study.paper_average("Llama-xLSTM + QKV + MM + H2H") == 49.41
    assert math.isnan(study.paper_average("Llama-DeltaNet + QKV"))  # not in the paper: never invented


def test_bad_outputs_and_unknown_students_name_the_fix(tmp_path):
    with pytest.raises(study.StudyError, match="does not exist"):
        study.find_runs(tmp_path / "nowhere")
    (tmp_path / "gla" / "r").mkdir(parents=True)
    (tmp_path / "gla" / "r" / "params.yaml").write_text("arch: gla\nrun_name: r\nqkv_copy: true\n")
    assert [r.label for r in study.find_runs(tmp_path)] == ["gla/r"]
    with pytest.raises(study.StudyError, match="no runs for \\['xlstm'\\]"):
        study.find_runs(tmp_path, "xlstm")
    with pytest.raises(study.StudyError, match="execute the notebook first"):
        study.export_html(tmp_path / "missing.ipynb")


def test_explorer_maps_are_the_teachers_and_the_widget_switches(tmp_path):
    """On a tiny teacher and a converted student: the explorer's teacher maps equal the
    teacher's own eager attention probabilities, its per-layer distances equal the Frobenius
    norms recomputed here, and setting the widget's controls redraws that layer and head."""
    from transformers import AutoModelForCausalLM

    from linearize.convert import convert
    from linearize.explorer import AttentionExplorer

    teacher, tok = _tiny_teacher(tmp_path / "t", hidden=32, layers=3, heads=4, kv_heads=2)
    teacher = teacher.double()
    students = {a: convert(teacher, a, qkv_copy=True).double().eval() for a in ARCHS}
    ex = AttentionExplorer(teacher, tok, students, TEXTS, max_tokens=12)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "t", attn_implementation="eager").double().eval()
    with torch.no_grad():
        ref = eager(ex.inputs[1], output_attentions=True).attentions
    for layer in range(3):
        a_t, a_s = ex.maps("gla", 1, layer)
        torch.testing.assert_close(a_t.double(), ref[layer][0], rtol=1e-4, atol=1e-5)
        assert a_s.shape == a_t.shape
        assert ex.distances("gla", 1)[layer] == pytest.approx(
            sum(torch.linalg.matrix_norm(a_t[h] - a_s[h]).item() for h in range(4)), rel=1e-4)

    calls = []
    draw = ex.figure
    ex.figure = lambda *args: calls.append(args) or draw(*args)  # record what the widget redraws
    box = ex.widget()
    box.controls["layer"].value = 2
    box.controls["head"].value = 3
    box.controls["student"].value = "deltanet"
    box.controls["example"].value = 1
    assert calls == [("gla", 0, 0, 0), ("gla", 2, 0, 0), ("gla", 2, 3, 0), ("deltanet", 2, 3, 0),
                     ("deltanet", 2, 3, 1)]
    # what the widget shows are the PNG bytes of its images: drawn, not blank, and the last view
    import io

    import numpy as np
    from PIL import Image

    for name, min_size in (("maps", (800, 300)), ("distance", (600, 150))):
        img = np.asarray(Image.open(io.BytesIO(box.images[name].value)).convert("L"))
        assert img.shape[1] >= min_size[0] and img.shape[0] >= min_size[1], (name, img.shape)
        assert (img < 235).mean() > 0.05, f"{name} image is nearly blank"
    assert box.status.value == ""
    # token labels on both axes, named query/key; teacher and student share one colour scale
    fig = ex.maps_figure("deltanet", 2, 3, 1)
    teacher_ax, student_ax, diff_ax = fig.axes[:3]
    tokens = [repr(t)[1:-1] for t in ex.tokens(1)]
    assert [t.get_text() for t in teacher_ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in student_ax.get_yticklabels()] == tokens
    assert teacher_ax.get_xlabel().startswith("key") and teacher_ax.get_ylabel().startswith("query")
    t_im, s_im, d_im = (ax.get_images()[0] for ax in (teacher_ax, student_ax, diff_ax))
    assert t_im.get_clim() == s_im.get_clim() == (0, pytest.approx(ex.maps("deltanet", 1, 2)[0][3].max().item()))
    assert d_im.get_clim()[0] == -d_im.get_clim()[1] and d_im.get_cmap().name == "RdBu_r"


# --- on the real tiny run -------------------------------------------------------------------
@pytest.mark.slow
def test_runs_and_tables_match_what_the_steps_wrote(tiny_study):
    outputs = tiny_study["outputs"]
    runs = study.find_runs(outputs)
    assert [(r.arch, r.variant) for r in runs] == [(a, v) for a in sorted(ARCHS) for v in VARIANTS]
    for r in runs:
        assert r.stages_done == ([3] if r.variant == "kd" else [1, 2, 3]) and r.finished
    assert [r.label for r in study.find_runs(outputs, "gla")] == ["gla/cpu-quick-kd", "gla/cpu-quick-qkv-mm-h2h"]

    t2, t3 = study.table2(runs, outputs), study.table3(runs, outputs)
    teacher_res = json.loads((outputs / "teacher" / "eval_limit4.json").read_text())
    for table in (t2, t3):
        teacher_row = table.iloc[0]
        assert teacher_row["run"] == "teacher" and teacher_row["paper Avg."] == 55.04
        assert teacher_row["Arc-E"] == pytest.approx(100 * teacher_res["tasks"]["arc_easy"]["acc"])
        assert math.isnan(teacher_row["Avg."])  # one task of six: no average
        assert teacher_row["val ppl"] == pytest.approx(_metrics(runs[0].dir)[0]["teacher_perplexity"])
    for r in runs:
        table = t2 if r.variant == "kd" else t3
        row = table[table["run"] == r.label].iloc[0]
        stage3 = next(m for m in _metrics(r.dir) if m.get("after") == "stage3")
        assert row["val ppl"] == pytest.approx(stage3["perplexity"]) and row["KL"] == pytest.approx(stage3["kl"])
        if r.label == UNEVALUATED:
            assert row[study.TASK_COLUMNS].isna().all() and row["docs/task"] == "-"
        else:
            res = json.loads((r.dir / "eval_limit4.json").read_text())
            assert row["Arc-E"] == pytest.approx(100 * res["tasks"]["arc_easy"]["acc"]) and row["docs/task"] == "4"
            assert row[["Lamb.", "PIQA", "HellaS."]].isna().all()
    # the paper's rows for students we ran stand beside ours; rows we did not run read '-'
    assert t2.loc["Llama-GLA", "paper Avg."] == 47.85
    assert t2.loc["Llama-GLA + MM", "run"] == "-" and math.isnan(t2.loc["Llama-GLA + MM", "Arc-E"])
    assert t3.loc["Llama-GLA + QKV + MM + H2H", "paper Avg."] == 48.58
    assert math.isnan(t3.loc["Llama-DeltaNet + QKV + MM + H2H", "paper Avg."])
    assert "Llama-xLSTM + QKV" not in t3.index  # a student we never ran gets no row
    assert study.show(t3).loc["Llama-GLA + QKV", "Arc-E"] == "-"

    val = study.validation_table(runs)
    kd = val.loc["gla/cpu-quick-kd"]
    assert math.isnan(kd["ppl stage1"]) and math.isnan(kd["KL stage2"])  # kd skips stages 1-2
    for r in runs:
        for m in _metrics(r.dir):
            if m.get("event") == "eval":
                assert val.loc[r.label, f"ppl {m['after']}"] == pytest.approx(m["perplexity"])


def _with_widget_probe(notebook: Path, path: Path) -> None:
    """05_study plus cells that build the explorer's widget and, after each control change,
    print digests of the PNGs its two Image widgets hold (what the browser shows are those bytes)."""
    import nbformat

    def probe(tag):
        return (f"import hashlib\nprint({tag!r}, [hashlib.sha1(box.images[k].value).hexdigest()"
                " for k in ('maps', 'distance')])")

    cells = [
        "box = explorer.widget()\nbox", probe("start"),
        "box.controls['layer'].value = 1", probe("layer"),
        "box.controls['head'].value = 2", probe("head"),
        "box.controls['student'].value = box.controls['student'].options[-1]", probe("student"),
    ]
    nb = nbformat.read(notebook, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


def _probe_digests(nb) -> dict:
    seen = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for line in out.get("text", "").splitlines() if out.get("name") == "stdout" else []:
                probe = re.match(r"(start|layer|head|student) (\[.*\])$", line)
                if probe:
                    seen[probe[1]] = tuple(json.loads(probe[2].replace("'", '"')))
    return seen


@pytest.mark.slow
def test_study_notebook_writes_tables_figures_page_html_and_its_widget_switches(tiny_study, tmp_path):
    import nbformat
    import papermill as pm

    outputs = tiny_study["outputs"]
    figures, page = tmp_path / "site" / "figures", tmp_path / "site" / "results.md"
    executed, probed = tmp_path / "05_study.ipynb", tmp_path / "05_probed.ipynb"
    _with_widget_probe(ROOT / "notebooks" / "05_study.ipynb", probed)
    pm.execute_notebook(str(probed), str(executed), cwd=str(ROOT),
                        kernel_name="python3", progress_bar=False,
                        parameters=dict(outputs=str(outputs), figures_dir=str(figures), results_page=str(page),
                                        explorer_texts=TEXTS, max_tokens=16))
    expected = ["validation.png", "training_curves.png", "decode_speed.png", "prefill_speed.png", "memory.png",
                "explorer_maps.png", "explorer_distance.png", "explorer_grid.png", "layer_alignment.png"]
    for name in expected:
        assert (figures / name).stat().st_size > 5_000, name

    text = page.read_text()
    for heading in ("## Table 2", "## Table 3", "## Validation perplexity", "## Training curves",
                    "## Speed and memory", "## Attention alignment"):
        assert heading in text
    for arch in ARCHS:
        for variant in VARIANTS:
            assert f"{arch}/cpu-quick-{variant}" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(Path(link).name for link in links) == sorted(expected)
    assert all((page.parent / link).exists() for link in links)  # relative links resolve
    # the table rows on the page carry the numbers of the results files
    res = json.loads((outputs / "gla" / "cpu-quick-kd" / "eval_limit4.json").read_text())
    row = next(line for line in text.splitlines() if "| gla/cpu-quick-kd |" in line and line.startswith("| Llama-GLA |"))
    # every accuracy beside its stderr (lm-eval without bootstrap leaves it out: its sample formula)
    acc = res["tasks"]["arc_easy"]["acc"]
    assert f"| {100 * acc:.2f} ± {100 * (acc * (1 - acc) / 3) ** 0.5:.2f} |" in row and "| 47.85 |" in row
    assert (page.with_suffix(".json")).exists()  # the page's JSON twin

    nb = nbformat.read(executed, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    # the widget: each control change put new figures into its images
    seen = _probe_digests(nb)
    assert list(seen) == ["start", "layer", "head", "student"]
    assert all(len(d) == 2 for d in seen.values()), seen  # maps figure + distance figure each time
    # a new layer redraws both figures (its bar is highlighted); a new head changes only the maps
    assert seen["layer"][0] != seen["start"][0] and seen["layer"][1] != seen["start"][1]
    assert seen["head"][0] != seen["layer"][0] and seen["head"][1] == seen["layer"][1]
    assert seen["student"][0] != seen["head"][0]

    html = study.export_html(executed, tmp_path / "05_study.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    # every figure of the results page is in the HTML as a static image (no kernel needed)
    import base64

    embedded = {hashlib.sha1(base64.b64decode(i)).hexdigest() for i in images}
    for name in expected:
        assert hashlib.sha1((figures / name).read_bytes()).hexdigest() in embedded, name


def test_validation_figure_gives_each_variant_its_panels_when_runs_are_many():
    """Many runs of several variants (the study grid): a perplexity panel (log) above a KL panel
    (linear, from 0, so a student at KL ~0 does not stretch it over decades) per variant, every
    panel of a metric on the same limits; a few runs keep the two shared panels."""
    from linearize import viz

    archs = ["gla", "xlstm", "deltanet", "retnet", "hgrn2", "mamba2", "metala", "rebased"]
    records = [{"run": f"{a}/g-{v}", "variant": v, "after": after, "perplexity": ppl * (1 + i), "KL": kl}
               for v in ("kd", "mm") for i, a in enumerate(archs)
               for after, ppl, kl in (("conversion", 4e4, 7.0), ("stage3", 2e3, 4.0 if a != "gla" else 1e-9))]
    fig = viz.plot_validation(records, ("conversion", "stage1", "stage3"), teacher_perplexity=30.0)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown if ax.get_title()] == ["kd", "mm"]
    assert len(shown) == 4
    ppl_axes = [ax for ax in shown if ax.get_yscale() == "log"]
    kl_axes = [ax for ax in shown if ax.get_yscale() == "linear"]
    assert len(ppl_axes) == len(kl_axes) == 2
    assert all(ax.get_ylim()[0] == 0 for ax in kl_axes)
    assert ppl_axes[0].get_ylim() == ppl_axes[1].get_ylim() and ppl_axes[0].get_ylim()[0] < 30.0
    assert [t.get_text() for t in ppl_axes[0].get_xticklabels()] == ["conv.", "st. 3"]  # only the stages it ran

    few = viz.plot_validation(records[:6], ("conversion", "stage1", "stage3"))
    assert len(few.axes) == 2
