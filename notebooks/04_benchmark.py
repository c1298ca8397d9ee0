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
# # 04 · Inference benchmark: speed and memory against context length
#
# The teacher decodes on a KV cache that grows with the context; each student decodes on a
# recurrent state of constant size. For every model and context length, one fresh process
# (`python -m linearize.bench point`) measures prefill tokens/s, decode tokens/s (median step
# of `steps` greedy steps after the prefill), peak RSS during prefill + decode, and the bytes
# of the weights and of the cache/state. A physical reference: a decode step must read every
# weight and the whole cache/state once, so `bytes_per_step / bandwidth` (bandwidth measured in
# the same run) bounds its speed; `fraction` is how close each model gets.
#
# Timings on a shared machine are noisy: note what else was running. On 2 CPU cores the
# default set takes about an hour, most of it the students' pure-PyTorch chunked prefill at
# 8192 and 16384 tokens; `reuse_csv=True` only redraws an existing CSV. The same run from a
# shell: `python -m linearize.bench run --models ... --lengths ... --student-lengths 16384`.

# %% tags=["parameters"]
models = "teacher,gla,deltanet,xlstm,mamba2"   # "teacher" and/or students (linearize.mixers.available())
lengths = "128,512,2048,8192"                  # context lengths; the teacher stops at its limit (8192)
student_lengths = "16384"                      # extra lengths for students only, beyond the teacher's limit
out = None                                     # CSV path; None: outputs/bench/bench.csv (relative: under the project root). PNGs go beside it
threads = 2
dtype = "float32"                              # one dtype per run (mixed dtypes slow CPU attention unevenly)
steps = 32                                     # timed decode steps per point
teacher = None                                 # None: embedded SmolLM2-135M-Instruct; or hub id / folder
device = "cpu"                                 # cpu, cuda or auto
reuse_csv = False                              # True: only read an existing CSV and plot it

# %%
from linearize import notebook_params
notebook_params.check(globals())  # a papermill -p name this notebook does not define is an error
import time
from pathlib import Path
from IPython.display import Image, display
from linearize import bench
from linearize.paths import OUTPUTS, project_path

out = project_path(out, OUTPUTS / "bench" / "bench.csv")
names = bench.as_list(models)
base, extra = bench.as_list(lengths, int), bench.as_list(student_lengths, int)
if reuse_csv:
    rows = bench.read_csv(out)
    print(f"read {len(rows)} rows from {out}")
else:
    print("started", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    rows = bench.run(names, base, out, teacher=teacher, dtype=dtype, threads=threads, steps=steps,
                     device=device, student_lengths=extra)
    print("finished", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))

# %% [markdown]
# ## Table
# `state_mib` is the cache (teacher) or recurrent state (students) after the prefill.

# %%
print(bench.format_table(rows))

# %% [markdown]
# ## The targets
# Students' decode flat within 10% from 128 to 8192; at 8192 the student/teacher speed ratio reaches 90% of the bytes-per-step ratio; state at least 20x smaller than the teacher's cache. The targets are set here; `bench.check_targets` checks whatever it is given (`python -m linearize.bench table CSV --target-range 128,8192 --flat-within 0.1 --bytes-share 0.9 --state-shrink 20` prints the same lines).

# %%
TARGETS = dict(low=128, high=8192, flat_within=0.10, bytes_share=0.90, state_shrink=20.0)
for line in bench.check_targets(rows, **TARGETS):
    print(line)

# %% [markdown]
# ## Curves (log-2 context axis)

# %%
for png in bench.plot(rows, out.parent):
    print(png)
    display(Image(filename=str(png)))
