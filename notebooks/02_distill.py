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
# # 02 · End-to-end distillation
#
# Stage 3 (docs/study.md, pipeline step 4): L = CE + alpha * KL(p_T || p_S), the KL averaged per token. Starts from the last finished alignment stage of the same run (`01_align`), or from a fresh conversion when there is none. Records validation perplexity and KL after the stage, and the distillation throughput against a plain forward+backward of the teacher measured in the same process.

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

stage3_tokens = None        # None: the preset's budget
kd_alpha = None             # None: the preset's (1.0)
kd_temperature = None
stage3_train = None         # None: "all"; or "mixers", "no-embeddings"

# %%
from linearize import notebook_params
notebook_params.check(globals())  # a papermill -p name this notebook does not define is an error
import time
import matplotlib.pyplot as plt
import yaml
from linearize import runs as R, stages as S, viz

# a value left at None defers to `overrides` (a mapping, or its JSON/YAML string from papermill -p),
# then to the student's settings and the preset
params, output_root = notebook_params.run_params(
    arch, preset, overrides, output_root, run_name=run_name, qkv_copy=qkv_copy, seed=seed, teacher=teacher, corpus=corpus, stage3_tokens=stage3_tokens, kd_alpha=kd_alpha, kd_temperature=kd_temperature, stage3_train=stage3_train)
print(yaml.safe_dump(params, sort_keys=False))
# record which alignment stages this run really had (the study names variants by them)
params = R.with_alignment_record(params, output_root)

# %% [markdown]
# ## Train

# %%
start = time.perf_counter()
result = S.run_pipeline(params, stages=(3,), root=output_root)
done = result['run'].done(3) or {}
print(f"run folder: {result['run'].dir}  ({time.perf_counter() - start:.0f} s); "
      f"started from: {done.get('start', 'n/a')}")

# %% [markdown]
# ## Loss curve

# %%
steps, evals = R.metrics_frames(result["run"].dir)
shown = steps[steps["stage"].isin([3])] if len(steps) else steps
fig = viz.plot_run_losses(steps, [3], S.STAGE_NAMES)
if fig is not None:
    viz.save_png(fig, result["run"].dir / "distill_loss.png")
    display(fig)
else:
    print("no training steps logged (stages disabled or reused)")

# %%
if len(shown) and 'kl' in shown:
    ax = shown.plot(x='tokens', y=['ce', 'kl'], figsize=(6, 3.2), logy=True)
    ax.set_title('stage 3: the two terms')
    plt.show()

# %% [markdown]
# ## Validation after each stage of this run, and throughput

# %%
cols = [c for c in ("after", "tokens", "stage_wall_s", "perplexity", "teacher_perplexity", "kl") if c in evals]
evals[cols] if len(evals) else "no validation yet"

# %%
thr = [r for r in result['run'].metrics() if r.get("event") == "throughput"]  # the run folder's one reader
thr[-1] if thr else 'throughput not measured (measure_teacher_throughput off or stage reused)'
