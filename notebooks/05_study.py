# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · The study: what the students kept of their teacher
#
# Reads `outputs/` only: the run folders of notebooks 01-02 (`outputs/<student>/<preset>-<variant>/`),
# the zero-shot results of notebook 03 beside them, the teacher's folder and the benchmark CSV of
# notebook 04. It shows the paper-format tables (our numbers next to the source paper's), the
# validation perplexity and KL after every stage, the training curves, the speed and memory curves,
# and an attention explorer (teacher vs student maps per layer and head). It writes the results
# page (`results_page`, markdown with the tables and the figures saved in `figures_dir`).
# A cell we have not measured shows `-`; nothing is filled in.

# %% tags=["parameters"]
outputs = None                    # None: the project's outputs/ ($LINEARIZE_OUTPUTS); relative paths: under the project root
students = None                   # None: every run found; or "gla,xlstm" / run labels "gla/cpu-quick-kd"
presets = None                    # None: runs of every preset; or "cpu-grid" (the runner passes its own)
grid = None                       # the runner's grid name ("study"): the page says how far that grid is
explorer_texts = [
    "The capital of France is Paris. It has been the capital since the Middle Ages, and it is famous for",
    "Mr. President, Mr. Speaker, members of Congress: tonight I report to you on the state of our Union.",
    "To compute the sum of a list in Python, call sum(values); to sort it, call sorted(values).",
]
max_tokens = 48                   # tokens per example in the explorer (maps are T x T)
figures_dir = "docs/figures"      # PNGs for the results page
results_page = "docs/results.md"  # the generated results page
metric = "acc"                    # "acc" (the paper's) or "acc_norm"
explorer_keep = 2                 # students held in memory at once by the explorer
explore = True                    # False: no attention explorer (records without weights, e.g. results/cpu-grid)

# %%
from linearize import notebook_params
notebook_params.check(globals())  # a papermill -p name this notebook does not define is an error
from pathlib import Path
from IPython.display import Image, Markdown, display
from linearize import analysis, study, viz
from linearize.paths import OUTPUTS, ROOT, project_path

outputs = project_path(outputs, OUTPUTS)
figures = project_path(figures_dir, ROOT / "docs" / "figures")
results_page = project_path(results_page, ROOT / "docs" / "results.md")
runs = study.find_runs(outputs, students, presets)
page_figures = {}
print(f"{len(runs)} run(s) under {outputs}; teacher: {study.teacher_name(runs, outputs)}")
study.runs_frame(runs)

# %% [markdown]
# ## Table 2: students without and with matrix mixing
# Stage 3 (end-to-end distillation) alone (`kd`) or after stage 1 (`mm`), Q/K/V not copied. Accuracy in percent; `paper Avg.` is the source paper's (SmolLM-360M teacher, 1B FineWeb tokens), so compare rankings rather than absolute numbers. `val ppl` and `KL` are measured after stage 3 on the held-out split.

# %%
study.show(study.table2(runs, outputs, metric))

# %% [markdown]
# ## Table 3: Q/K/V copy, matrix mixing and hidden-to-hidden ablations
# `qkv` copies the teacher's projections, `mm` adds stage 1, `h2h` stage 2; the paper reports these for xLSTM and GLA.

# %%
study.show(study.table3(runs, outputs, metric))

# %% [markdown]
# ## Beyond the paper: the project's recipe for every student
# QKV copy, closed-form readout fit, attention transfer (stage 0), then distillation: the study grid's first column (`qkv-fit-at`), and for the five gated students its last, after the gate initialisation from the teacher's attention distances (`qkv-fit-at-gi`, `make study`'s default for them).

# %%
recipe_table = study.table_recipe(runs, outputs, metric)
study.show(recipe_table) if len(recipe_table) > 1 else print("no recipe runs (variants qkv-fit-at, qkv-fit-at-gi of the runner)")

# %% [markdown]
# ## Beyond the paper: closed-form readout fit after conversion
# `fit` solves every layer's o_proj by ridge least squares to the teacher's attention output before any training (`linearize.calibrate`); the paper's best recipe stands beside it. Runs come from `python -m linearize.runner --grid fit`.

# %%
fit_table = study.table_fit(runs, outputs, metric)
study.show(fit_table) if len(fit_table) > 1 else print("no readout-fit runs (grid 'fit' of the runner)")

# %% [markdown]
# ## Validation perplexity and per-token KL after conversion and each stage
# A stage the variant skips shows `-`; the dashed line is the teacher's perplexity.

# %%
display(study.show(study.validation_table(runs)))
png = page_figures["Validation perplexity and KL after each stage"] = study.plot_validation(runs, figures / "validation.png")
display(Image(filename=str(png))) if png else print("no validation logged yet")

# %% [markdown]
# ## Training curves
# Loss against the tokens seen in each stage, one line per run.

# %%
png = page_figures["Training curves"] = study.plot_training_curves(runs, figures / "training_curves.png")
display(Image(filename=str(png))) if png else print("no training steps logged yet")

# %% [markdown]
# ## Speed and memory against context (benchmark)
# From `outputs/bench/bench.csv`: decode and prefill tokens/s, cache/state size and peak memory, log-2 context axis. The table rounds the numbers (the CSV keeps them in full).
#
# *Roofline tokens/s* is the fastest a decode step could run if it only had to read every weight and the whole cache/state once at the memory bandwidth measured in the same run (bytes per step / bandwidth); the measured decode speed stays below it, and `fraction` in the CSV says how close it gets. The teacher has no point beyond its context limit (8192 tokens for SmolLM2), so its curves stop where the students' go on.

# %%
pngs = page_figures["Speed and memory against context"] = study.bench_figures(outputs, figures)
if pngs:
    display(study.bench_table(outputs))
    for png in pngs:
        display(Image(filename=str(png)))
else:
    print(f"no benchmark yet: {outputs / 'bench' / 'bench.csv'} is missing (notebooks/04_benchmark.ipynb)")

# %% [markdown]
# ## Attention explorer
# Each student layer sees the teacher's input to that layer (as in stage 1), so a map shows how well that mixer alone imitates the teacher's attention head. The bars give the matrix-mixing distance per layer (what stage 1 minimises). The static views below (the widget's first view and a grid of a few layers and heads) are images, so the exported HTML page shows them without a kernel.

# %%
with viz.quiet_loading():  # no weight-loading progress bars among the figures
    explorer = (study.build_explorer(runs, explorer_texts, max_tokens, keep=explorer_keep, outputs=outputs)
                if runs and explore else None)
if explorer is not None:
    pngs = page_figures["Attention alignment (explorer's first view)"] = study.save_explorer_view(explorer, figures)
    for png in pngs:
        display(Image(filename=str(png)))
elif explore:
    page_figures["Attention alignment (explorer's first view)"] = None
    print("no student runs to explore yet")
else:  # a records-only page (make grid-page) has no section for what it cannot draw
    print("explorer off (explore=False)")

# %% [markdown]
# ### Per layer: how far each student is from the teacher before and after each alignment stage
# From each run's `metrics.jsonl`: the per-layer loss of stage 1 (matrix-mixing distance, what the maps above
# show) and of stage 2 (hidden-state distance) at the first logged step (dashed, before the stage has done much)
# and the last (solid). A run without stages 1-2 (`kd`, `qkv`) has no line here.

# %%
alignment = viz.plot_layer_alignment(study.layer_losses_frame(runs))
if alignment is not None:
    page_figures["Per-layer distance to the teacher before and after alignment"] = viz.save_png(
        alignment, figures / "layer_alignment.png")
    display(Image(filename=str(figures / "layer_alignment.png")))
else:
    print("no run logged per-layer losses (stages 1-2 did not run)")

# %% [markdown]
# ### Interactive explorer
# Pick student, example, layer and head: teacher and student maps on one colour scale (the teacher's), their
# difference on a diverging scale, and the per-layer distance of that student on that example.
#
# **In the exported HTML page (read offline) the explorer below is empty**: its controls need a running kernel,
# and the widget's scripts (require.js, the widget manager) would come from a CDN. The static views above show
# the same maps; open the notebook in JupyterLab to explore.

# %%
explorer_widget = explorer.widget() if explorer is not None else None
display(explorer_widget) if explorer_widget is not None else print("no explorer (see above)")

# %% [markdown]
# ## Results page
# Generated from the outputs above, not typed by hand.

# %%
grid_of = (presets, grid) if grid and presets and "," not in presets else None
page = analysis.write_results_page(results_page, outputs, runs, page_figures, metric, grid=grid_of)
print(f"wrote {page}")
display(Markdown(f"[{page}]({page})"))
