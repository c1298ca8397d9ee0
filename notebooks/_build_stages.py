"""Write notebooks/01_align.ipynb and notebooks/02_distill.ipynb (run: python notebooks/_build_stages.py).

The notebooks are generated so that their code stays reviewable here, in one place; edit this
file and re-run it rather than editing the .ipynb files by hand.
"""
from nbformat.v4 import new_code_cell, new_markdown_cell

from _nbtools import notebook, parameters_cell, write


COMMON_PARAMS = '''
arch = "gla"                # student mixer: linearize.mixers.available()
preset = "cpu-quick"        # params/presets/: cpu-quick (minutes), cpu-study (hours), paper (GPU)
run_name = None             # None: the preset's name -> outputs/<arch>/<run_name>/
qkv_copy = True             # copy the teacher's Q/K/V/O (Table 2 of the paper turns it off)
seed = 0
teacher = None              # None: the preset's (embedded SmolLM2-135M-Instruct); or hub id / folder
corpus = None               # None: the preset's (embedded State of the Union corpus)
overrides = {}              # any other key of linearize.params.DEFAULTS, e.g. {"seq_len": 256}
output_root = None          # None: outputs/
'''

SETUP = '''
import json, time
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import yaml
from linearize import params as P, stages as S

notebook_values = dict(run_name=run_name, qkv_copy=qkv_copy, seed=seed, teacher=teacher, corpus=corpus, {extra})
# a notebook value left at None defers to `overrides`, then to the student's settings and the preset
params = P.resolve(arch, preset, {{**overrides, **{{k: v for k, v in notebook_values.items() if v is not None}}}})
print(yaml.safe_dump(params, sort_keys=False))
'''

CURVES = '''
steps, evals = S.metrics_frames(result["run"].dir)
shown = steps[steps["stage"].isin({stages})] if len(steps) else steps
if len(shown):
    fig, axes = plt.subplots(1, len({stages}), figsize=(5.5 * len({stages}), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], {stages}):
        part = shown[shown["stage"] == stage]
        sns.lineplot(data=part, x="tokens", y="loss", ax=ax)
        ax.set_title(f"stage {{stage}}: {{S.STAGE_NAMES[stage]}}")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(result["run"].dir / "{figure}", dpi=110)
else:
    print("no training steps logged (stages disabled or reused)")
'''

EVALS = '''
cols = [c for c in ("after", "tokens", "stage_wall_s", "perplexity", "teacher_perplexity", "kl") if c in evals]
evals[cols] if len(evals) else "no validation yet"
'''


def align_notebook():
    cells = [
        new_markdown_cell(
            "# 01 · Alignment: matrix mixing and hidden-to-hidden\n\n"
            "Converts the teacher into the student `arch` and runs the two layer-local alignment stages "
            "of MOHAWK (docs/study.md, pipeline steps 2-3): stage 1 pulls each mixer's materialised mixing "
            "matrix towards the teacher's attention, stage 2 pulls each student layer's output towards "
            "the teacher's, from the teacher's layer inputs. Only mixer parameters train. Validation "
            "perplexity and per-token KL to the teacher are recorded after conversion and after each "
            "stage. The run lives in `outputs/<arch>/<run_name>/`; running again resumes (an "
            "interrupted stage continues from its checkpoint, a finished one is reused), and "
            "`02_distill` continues from it."
        ),
        parameters_cell(COMMON_PARAMS + '''
matrix_mixing = True        # run stage 1
h2h = True                  # run stage 2
stage1_tokens = None        # None: the preset's budget
stage2_tokens = None
'''),
        new_code_cell(SETUP.format(extra="matrix_mixing=matrix_mixing, h2h=h2h, "
                                         "stage1_tokens=stage1_tokens, stage2_tokens=stage2_tokens").strip()),
        new_markdown_cell("## Train\n\nTeacher and corpus load, the student is converted (or reloaded), "
                          "then the enabled stages run with progress bars (tokens/s, loss)."),
        new_code_cell("start = time.perf_counter()\n"
                      "result = S.run_pipeline(params, stages=(1, 2), root=output_root)\n"
                      "print(f\"run folder: {result['run'].dir}  ({time.perf_counter() - start:.0f} s)\")"),
        new_markdown_cell("## Loss curves"),
        new_code_cell(CURVES.format(stages="[1, 2]", figure="align_losses.png").strip()),
        new_markdown_cell("Per-layer losses at the last logged step of each stage."),
        new_code_cell(
            "if len(shown) and 'layer_losses' in shown:\n"
            "    last = shown.groupby('stage').tail(1)\n"
            "    per_layer = pd.DataFrame({f'stage {r.stage}': r.layer_losses for r in last.itertuples()})\n"
            "    ax = per_layer.plot(marker='o', figsize=(7, 3.2), logy=True)\n"
            "    ax.set_xlabel('layer'); ax.set_ylabel('loss')\n"
            "    plt.show()"
        ),
        new_markdown_cell("## Validation: perplexity and per-token KL to the teacher"),
        new_code_cell(EVALS.strip()),
    ]
    return notebook(cells)


def distill_notebook():
    cells = [
        new_markdown_cell(
            "# 02 · End-to-end distillation\n\n"
            "Stage 3 (docs/study.md, pipeline step 4): L = CE + alpha * KL(p_T || p_S), the KL averaged per "
            "token. Starts from the last finished alignment stage of the same run (`01_align`), or from "
            "a fresh conversion when there is none. Records validation perplexity and KL after the "
            "stage, and the distillation throughput against a plain forward+backward of the teacher "
            "measured in the same process."
        ),
        parameters_cell(COMMON_PARAMS + '''
stage3_tokens = None        # None: the preset's budget
kd_alpha = None             # None: the preset's (1.0)
kd_temperature = None
stage3_train = None         # None: "all"; or "mixers", "no-embeddings"
'''),
        new_code_cell(SETUP.format(extra="stage3_tokens=stage3_tokens, kd_alpha=kd_alpha, "
                                         "kd_temperature=kd_temperature, stage3_train=stage3_train").strip()
                      + "\n# record which alignment stages this run really had (the study names variants by them)\n"
                        "params = S.with_alignment_record(params, output_root)"),
        new_markdown_cell("## Train"),
        new_code_cell("start = time.perf_counter()\n"
                      "result = S.run_pipeline(params, stages=(3,), root=output_root)\n"
                      "done = result['run'].done(3) or {}\n"
                      "print(f\"run folder: {result['run'].dir}  ({time.perf_counter() - start:.0f} s); \"\n"
                      "      f\"started from: {done.get('start', 'n/a')}\")"),
        new_markdown_cell("## Loss curve"),
        new_code_cell(CURVES.format(stages="[3]", figure="distill_loss.png").strip()),
        new_code_cell(
            "if len(shown) and 'kl' in shown:\n"
            "    ax = shown.plot(x='tokens', y=['ce', 'kl'], figsize=(6, 3.2), logy=True)\n"
            "    ax.set_title('stage 3: the two terms')\n"
            "    plt.show()"
        ),
        new_markdown_cell("## Validation after each stage of this run, and throughput"),
        new_code_cell(EVALS.strip()),
        new_code_cell(
            "thr = [json.loads(l) for l in open(result['run'].metrics_path) if '\"throughput\"' in l]\n"
            "thr[-1] if thr else 'throughput not measured (measure_teacher_throughput off or stage reused)'"
        ),
    ]
    return notebook(cells)


if __name__ == "__main__":
    for name, nb in (("01_align.ipynb", align_notebook()), ("02_distill.ipynb", distill_notebook())):
        write(nb, name)
