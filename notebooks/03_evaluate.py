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
# # 03 · Evaluate: the paper's six tasks, perplexity and KL
#
# Zero-shot lm-evaluation-harness on LAMBADA (OpenAI), WinoGrande, ARC-Easy, ARC-Challenge, PIQA
# and HellaSwag (docs/study.md, pipeline step 5), from the embedded data (`linearize.tasks`) or lm-eval's
# hub tasks with `online=True`. Evaluates a run's student (`run_dir`) or a teacher (`teacher`),
# saves `eval_<full|limitN>.json` in the run folder, and shows the table in the paper's format
# (unnormalised accuracy, percent) beside the teacher measured with the same settings and the
# paper's rows (its teacher was SmolLM-360M, its LAMBADA the mean of standard and OpenAI).
# For a student it also reports validation perplexity and per-token KL(p_T || p_S).

# %% tags=["parameters"]
run_dir = None          # a run folder (outputs/<arch>/<run_name>) or saved student; None: evaluate `teacher`
teacher = None          # teacher name, hub id or folder (None: embedded SmolLM2-135M-Instruct)
tasks = ["lambada_openai", "winogrande", "arc_easy", "arc_challenge", "piqa", "hellaswag"]
limit = 100             # documents per task (None: all - hours on a 2-core CPU)
batch_size = 8
workers = "auto"        # processes the tasks are split over on a CPU ("auto": one per torch thread; 1: this process)
online = False          # True: lm-eval's stock tasks from the Hugging Face hub
autocast = None         # None: float32; "bfloat16": ~1.8x faster on a CPU with AMX, slower without; scores moved < 0.5 points for the teacher and a trained student (docs/speed.md)
resume = True           # keep each scored request in <folder>/eval_cache/<weights digest>: a stopped evaluation resumes
metric = "acc"          # table metric: "acc" (the paper's) or "acc_norm"
compare_teacher = True  # also evaluate the teacher with the same tasks/limit (reused when saved)
show_paper = True       # append the paper's rows
kl_blocks = 8           # validation blocks for perplexity / KL (0: skip)
seq_len = 256
corpus = "embedded"
output_dir = None       # the teacher's results folder, written or reused (None: outputs/teacher); relative: under the project root

# %%
from linearize import notebook_params
notebook_params.check(globals())  # a papermill -p name this notebook does not define is an error
import json
from pathlib import Path
import pandas as pd
from linearize import evaluate as E
from linearize.paths import OUTPUTS, project_path
from linearize.teacher import load_teacher

teacher_model, teacher_tok = load_teacher(teacher)
teacher_label = f"teacher: {teacher or 'smollm2-135m-instruct'}"
teacher_dir = project_path(output_dir, OUTPUTS / "teacher")
if run_dir:
    run_dir = project_path(run_dir, OUTPUTS)
    model, tok, label = E.load_model(run_dir)
    out = Path(run_dir)
else:
    model, tok, label = teacher_model, teacher_tok, teacher_label
    out = teacher_dir
print(label, "->", out)

# %% [markdown]
# ## Tasks

# %%
results = E.evaluate_tasks(model, tok, tasks=tasks, limit=limit, batch_size=batch_size,
                           online=online, output_dir=out, label=label, workers=workers, autocast=autocast,
                           cache=E.request_cache(out, model, autocast=autocast) if resume else None)
print(f"{results['wall_time_s']:.0f} s")

# %%
rows = {label: results}
if run_dir and compare_teacher:
    saved = E.results_path(teacher_dir, limit, online, autocast)
    prior = E.load_results(saved) if saved.exists() else None
    if prior is None or prior["model"] != teacher_label or not set(tasks) <= set(prior["tasks"]):
        prior = E.evaluate_tasks(teacher_model, teacher_tok, tasks=tasks, limit=limit,
                                 batch_size=batch_size, online=online, output_dir=teacher_dir,
                                 label=teacher_label, workers=workers, autocast=autocast,
                                 cache=E.request_cache(teacher_dir, teacher_model, autocast=autocast) if resume else None)
    rows[teacher_label] = prior

# %% [markdown]
# ## Table (percent; paper rows marked as such)

# %%
table = E.results_table(rows, E.PAPER_ROWS if show_paper else None, metric=metric)
table.to_csv(out / "eval_table.csv")
table

# %% [markdown]
# Per task: accuracy, acc_norm, LAMBADA perplexity, standard errors, documents.

# %%
pd.DataFrame({name: {k: v for k, v in m.items() if k != "per_doc"} for name, m in results["tasks"].items()}).T

# %% [markdown]
# ## Validation perplexity and per-token KL to the teacher

# %%
if run_dir and kl_blocks:
    from linearize.data import token_blocks
    blocks = token_blocks(teacher_tok, corpus, seq_len=seq_len, split="validation", max_blocks=kl_blocks)
    ppl_kl = E.perplexity_and_kl(model, teacher_model, blocks)
    (out / "eval_perplexity_kl.json").write_text(json.dumps(ppl_kl, indent=2))
    print(ppl_kl)
