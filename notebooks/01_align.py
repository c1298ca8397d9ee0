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
# # 01 · Alignment: matrix mixing and hidden-to-hidden (and attention transfer)
#
# Converts the teacher into the student `arch` and runs the layer-local alignment stages: stage 0, attention-output transfer (beyond the paper, when `attention_transfer` is on, e.g. the `cpu-recipe` preset or the runner's `qkv-fit-at` variant: each mixer regressed onto the teacher's attention output), then the two stages of MOHAWK (docs/study.md, pipeline steps 2-3): stage 1 pulls each mixer's materialised mixing matrix towards the teacher's attention, stage 2 pulls each student layer's output towards the teacher's, from the teacher's layer inputs. Only mixer parameters train. Validation perplexity and per-token KL to the teacher are recorded after conversion and after each stage. The run lives in `outputs/<arch>/<run_name>/`; running again resumes (an interrupted stage continues from its checkpoint, a finished one is reused), and `02_distill` continues from it.

# %% tags=["parameters"]
arch = "gla"                # student mixer: linearize.mixers.available()
preset = "cpu-quick"        # params/presets/: cpu-quick (minutes), cpu-study (hours), paper (GPU)
run_name = None             # None: the preset's name -> outputs/<arch>/<run_name>/
qkv_copy = True             # copy the teacher's Q/K/V/O (Table 2 of the paper turns it off)
seed = 0
teacher = None              # None: the preset's (embedded SmolLM2-135M-Instruct); or hub id / folder
corpus = None               # None: the preset's (embedded State of the Union corpus)
overrides = {}              # any other key of linearize.params.DEFAULTS, e.g. {"seq_len": 256} (or as a JSON/YAML string)
output_root = None          # None: the project's outputs/ ($LINEARIZE_OUTPUTS); relative: under the project root

matrix_mixing = True        # run stage 1
h2h = True                  # run stage 2
stage1_tokens = None        # None: the preset's budget
stage2_tokens = None

# %%
from linearize import notebook_params
notebook_params.check(globals())  # a papermill -p name this notebook does not define is an error
import time
import matplotlib.pyplot as plt
import pandas as pd
import yaml
from linearize import runs as R, stages as S, viz

# a value left at None defers to `overrides` (a mapping, or its JSON/YAML string from papermill -p),
# then to the student's settings and the preset
params, output_root = notebook_params.run_params(
    arch, preset, overrides, output_root, run_name=run_name, qkv_copy=qkv_copy, seed=seed, teacher=teacher, corpus=corpus, matrix_mixing=matrix_mixing, h2h=h2h, stage1_tokens=stage1_tokens, stage2_tokens=stage2_tokens)
print(yaml.safe_dump(params, sort_keys=False))

# %% [markdown]
# ## Train
#
# Teacher and corpus load, the student is converted (or reloaded), then the enabled stages run with progress bars (tokens/s, loss).

# %%
start = time.perf_counter()
result = S.run_pipeline(params, stages=(0, 1, 2), root=output_root)
print(f"run folder: {result['run'].dir}  ({time.perf_counter() - start:.0f} s)")

# %% [markdown]
# ## Loss curves

# %%
steps, evals = R.metrics_frames(result["run"].dir)
shown = steps[steps["stage"].isin([0, 1, 2])] if len(steps) else steps
fig = viz.plot_run_losses(steps, [0, 1, 2], S.STAGE_NAMES)
if fig is not None:
    viz.save_png(fig, result["run"].dir / "align_losses.png")
    display(fig)
else:
    print("no training steps logged (stages disabled or reused)")

# %% [markdown]
# Per-layer losses at the last logged step of each stage.

# %%
if len(shown) and 'layer_losses' in shown:
    last = shown.groupby('stage').tail(1)
    per_layer = pd.DataFrame({f'stage {r.stage}': r.layer_losses for r in last.itertuples()})
    ax = per_layer.plot(marker='o', figsize=(7, 3.2), logy=True)
    ax.set_xlabel('layer'); ax.set_ylabel('loss')
    plt.show()

# %% [markdown]
# ## Validation: perplexity and per-token KL to the teacher

# %%
cols = [c for c in ("after", "tokens", "stage_wall_s", "perplexity", "teacher_perplexity", "kl") if c in evals]
evals[cols] if len(evals) else "no validation yet"
