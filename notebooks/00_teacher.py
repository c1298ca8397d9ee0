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
# # 00 · The teacher
#
# Loads the teacher, lets it generate, shows one layer's attention heads (the maps the students' materialised mixing matrices are aligned to in stage 1), and reports its validation perplexity on the held-out split of the training corpus. Parameters are papermill-overridable.

# %% tags=["parameters"]
teacher = "smollm2-135m-instruct"   # embedded default; or a Llama hub id / local folder
prompt = "The capital of France is"
max_new_tokens = 24
attention_text = "The quick brown fox jumps over the lazy dog because the dog was asleep."
layer = 12                 # which layer's heads to show
heads = "all"              # "all" or a list of head indices
corpus = "embedded"        # corpus for validation perplexity
seq_len = 512
eval_blocks = 16           # validation blocks for perplexity; 0 means all
output_dir = None          # None: outputs/teacher of the project ($LINEARIZE_OUTPUTS/teacher); relative: under the project root

# %%
from linearize import notebook_params
notebook_params.check(globals())  # a papermill -p name this notebook does not define is an error
import json, time
from pathlib import Path
import torch
from linearize.teacher import load_teacher, iter_layers
from linearize.data import token_blocks
from linearize.evaluate import perplexity_and_kl
from linearize.paths import OUTPUTS, project_path
from linearize.viz import plot_attention_heads

out = project_path(output_dir, OUTPUTS / "teacher"); out.mkdir(parents=True, exist_ok=True)
start = time.perf_counter()
model, tok = load_teacher(teacher)
load_s = time.perf_counter() - start
n_params = sum(p.numel() for p in model.parameters())
print(f"{teacher}: {model.config.model_type}, {n_params/1e6:.1f}M parameters, "
      f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads "
      f"({model.config.num_key_value_heads} KV), loaded in {load_s:.1f} s")

# %% [markdown]
# ## Generation (greedy)

# %%
ids = tok(prompt, return_tensors="pt").input_ids
gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
completion = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
print(prompt + "\u2192" + completion)

# %% [markdown]
# ## Attention heads of one layer
#
# Causal softmax maps recomputed layer by layer (`linearize.teacher.iter_layers`): only this layer's T x T maps are ever materialised.

# %%
ids = tok(attention_text, return_tensors="pt").input_ids
trace = next(iter_layers(model, ids, layers=[layer]))
tokens = tok.convert_ids_to_tokens(ids[0])
fig = plot_attention_heads(trace.attn[0], tokens=[t.replace("\u0120", " ") for t in tokens], heads=heads,
                           title=f"{teacher}: layer {layer}")
fig.savefig(out / f"attention_layer{layer}.png", dpi=110)

# %% [markdown]
# ## Validation perplexity

# %%
blocks = token_blocks(tok, source=corpus, seq_len=seq_len, split="validation",
                     max_blocks=eval_blocks or None)
start = time.perf_counter()
metrics = perplexity_and_kl(model, None, blocks)
ppl_s = time.perf_counter() - start
print(f"validation perplexity on {blocks.shape[0]} x {seq_len} tokens of {corpus!r}: "
      f"{metrics['perplexity']:.2f} ({ppl_s:.0f} s)")
summary = dict(teacher=teacher, parameters=n_params, load_seconds=load_s, prompt=prompt, completion=completion,
               validation_blocks=int(blocks.shape[0]), seq_len=seq_len, corpus=corpus,
               validation_perplexity=metrics["perplexity"])
summary_path = out / "teacher.json"
summary_path.write_text(json.dumps(summary, indent=2))
print(f"wrote {summary_path}")
