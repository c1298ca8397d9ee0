"""Plots shared by the notebooks: attention heads, the study's figures (training curves,
validation, benchmark) and the figures the attention explorer (:mod:`linearize.explorer`)
draws, all with one style per model.

The explorer's and the study's figures draw on ``matplotlib.figure.Figure`` objects with the Agg
canvas, never on pyplot's global figure list: a widget callback that drew through pyplot and an
``Output`` area came back blank or cut off in 17 of 30 redraws in JupyterLab (issue 19), and a
figure that is never registered with pyplot cannot be shown twice or leak."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch


def _as_numpy(a) -> np.ndarray:
    return a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def plot_attention_heads(attn, tokens: list[str] | None = None, heads=None, title: str = "", ncols: int = 3,
                         size: float = 3.2):
    """Grid of one layer's causal attention maps, one panel per head. attn: [H, T, T]."""
    a = _as_numpy(attn)
    heads = list(range(a.shape[0])) if heads in (None, "all") else list(heads)
    ncols = min(ncols, len(heads))
    nrows = math.ceil(len(heads) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads):
        ax.imshow(a[h], cmap="viridis", vmin=0, vmax=max(a[h].max(), 1e-9))
        ax.set_title(f"head {h}", fontsize=9)
        if tokens is not None and len(tokens) <= 24:
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        else:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# One style per model, in every figure
# ---------------------------------------------------------------------------------------
# (colour, marker, line style) per model; the teacher is black so that no student is ever
# mistaken for it. Line styles differ too, so that two models with equal values (GLA's and
# xLSTM's decode roofline) both stay visible.
MODEL_STYLES = {
    "teacher": ("black", "s", "-"),
    "gla": ("tab:blue", "o", "-"),
    "xlstm": ("tab:orange", "^", (0, (5, 3))),
    "deltanet": ("tab:green", "D", (0, (1, 2))),
    "mamba2": ("tab:red", "v", (0, (6, 2, 1, 2))),
    "retnet": ("tab:purple", "P", (0, (3, 2))),
    "hgrn2": ("tab:brown", "X", (0, (8, 2, 1, 2, 1, 2))),
    "metala": ("tab:pink", "<", (0, (2, 1))),
    "rebased": ("tab:olive", ">", (0, (4, 1, 1, 1))),
    "hedgehog": ("tab:cyan", "h", (0, (10, 3))),
    "llama": ("tab:gray", "*", "-"),
}
# Variants of one student share its colour and marker and differ by line style.
VARIANT_LINESTYLES = {"kd": (0, (1, 1)), "mm": (0, (4, 2)), "qkv": (0, (2, 1, 1, 1)), "qkv-mm": (0, (6, 2, 1, 2)),
                      "qkv-mm-h2h": "-", "mm-h2h": (0, (8, 3)), "qkv-fit": (0, (3, 1, 1, 1, 1, 1)),
                      "qkv-fit-mm-h2h": (0, (10, 2, 2, 2))}
UNKNOWN_STYLE = ("tab:gray", "*", "-")


def model_style(name: str, variant: str | None = None) -> dict:
    """Matplotlib keywords (color, marker, linestyle) for a model: a student name ("gla"), a run
    label ("gla/cpu-quick-kd") or "teacher". The colour and marker depend only on the student,
    so a model looks the same in every figure; a variant (a run's figures) sets the line style."""
    arch = str(name).split("/")[0].lower()
    color, marker, linestyle = MODEL_STYLES.get(arch, UNKNOWN_STYLE)
    if variant is not None:
        linestyle = VARIANT_LINESTYLES.get(variant, "-")
    return {"color": color, "marker": marker, "linestyle": linestyle}


def run_style(label: str, variant: str | None = None) -> dict:
    return model_style(label, variant)


def new_figure(width: float, height: float):
    """A Figure with an Agg canvas that pyplot does not track (nothing to close, nothing shown twice)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (Agg), for an ``ipywidgets.Image``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig, path, dpi: int = 110):
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def legend_outside(fig, axes, title: str | None = None, fontsize: float = 10) -> None:
    """One legend for the figure, right of the axes, so that it covers no data."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
        if ax.get_legend():
            ax.get_legend().remove()
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right center", fontsize=fontsize,
                   title=title, title_fontsize=fontsize, frameon=False)


# ---------------------------------------------------------------------------------------
# Teacher / student attention maps
# ---------------------------------------------------------------------------------------
def _token_axes(ax, tokens, fontsize=6):
    if tokens is None:
        return
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], fontsize=fontsize)
    ax.set_xlabel("key (token attended to)", fontsize=9)
    ax.set_ylabel("query (token attending)", fontsize=9)


def plot_maps_side_by_side(teacher_map, student_map, title: str = "", tokens: list[str] | None = None, fig=None):
    """Teacher map, student map and student - teacher for one head. Maps: [T, T].

    Teacher and student share one colour scale, the teacher's [0, max]: the student's
    materialised matrix is not normalised (GLA's ran from -5 to 3.7), and a scale stretched to
    it turned the teacher's map uniformly dark. Student values outside the scale are clipped
    (the colour bar's arrows; the panel title gives their real range). The difference has its
    own symmetric diverging scale."""
    t, s = _as_numpy(teacher_map), _as_numpy(student_map)
    diff = s - t
    lim = max(float(np.abs(diff).max()), 1e-9)
    vmax = max(float(t.max()), 1e-9)
    fig = fig or new_figure(16, 6.2)
    axes = fig.subplots(1, 3)
    shared = dict(cmap="viridis", vmin=0, vmax=vmax)
    axes[0].imshow(t, **shared)
    axes[0].set_title("teacher (softmax)", fontsize=10)
    im = axes[1].imshow(s, **shared)
    clipped = s.min() < 0 or s.max() > vmax
    axes[1].set_title(f"student (materialised){', values %.2g..%.2g, clipped' % (s.min(), s.max()) if clipped else ''}",
                      fontsize=10)
    extend = "both" if s.min() < 0 and s.max() > vmax else "min" if s.min() < 0 else "max" if s.max() > vmax else "neither"
    fig.colorbar(im, ax=axes[:2], shrink=0.8, extend=extend, label="attention weight (shared scale)")
    im = axes[2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[2].set_title("student - teacher", fontsize=10)
    fig.colorbar(im, ax=axes[2], shrink=0.8, label="difference")
    for ax in axes:
        _token_axes(ax, tokens)
    fig.suptitle(title, fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------
# Loading students quietly (the explorer, linearize.explorer, and the study notebook)
# ---------------------------------------------------------------------------------------
def quiet_loading():
    """Context in which transformers and the hub draw no progress bars (the "Loading weights"
    bar would otherwise appear inside the explorer when a student loads)."""
    import contextlib

    @contextlib.contextmanager
    def quiet():
        from transformers.utils import logging as hf_logging

        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was:
                hf_logging.enable_progress_bar()

    return quiet()


# ---------------------------------------------------------------------------------------
# Per-layer alignment before and after each stage
# ---------------------------------------------------------------------------------------
def plot_layer_alignment(frame, title: str = ""):
    """Per-layer loss at the first and last logged step of stages 1 (matrix mixing) and 2
    (hidden-to-hidden), one panel per stage, one colour per student, dashed before / solid after.
    ``frame``: rows of (run, student, variant, stage, when, step, layer, loss) from
    ``study.layer_losses_frame``. None when the frame is empty."""
    if frame is None or len(frame) == 0:
        return None
    stages = sorted(frame["stage"].unique())
    fig = new_figure(6.5 * len(stages) + 2.5, 3.8)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    names = {1: "stage 1: matrix-mixing distance", 2: "stage 2: hidden-state distance"}
    for ax, stage in zip(axes, stages):
        part = frame[frame["stage"] == stage]
        for (run, when), rows in part.groupby(["run", "when"], sort=False):
            style = model_style(run)
            rows = rows.sort_values("layer")
            ax.plot(rows["layer"], rows["loss"], color=style["color"], marker=style["marker"], markersize=6,
                    markerfacecolor="none" if when == "before" else style["color"],
                    linestyle="--" if when == "before" else "-", alpha=0.6 if when == "before" else 0.9,
                    label=f"{run} ({when}: step {int(rows['step'].iloc[0])})")
        ax.set_title(names.get(int(stage), f"stage {stage}"), fontsize=11)
        ax.set_xlabel("layer", fontsize=10)
        ax.set_ylabel("loss per layer", fontsize=10)
        values = part["loss"][part["loss"] > 0]
        if len(values) and values.max() / values.min() > 10:
            ax.set_yscale("log")
    legend_outside(fig, axes, fontsize=8)
    fig.suptitle(title or "How far each student layer is from the teacher's: first (dashed) and last (solid) "
                          "logged step of each alignment stage", fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------
# The study's figures (linearize.study and linearize.bench call these)
# ---------------------------------------------------------------------------------------
def _log_if_wide(ax, values) -> None:
    """Log y only when the values span more than a decade (a short curve on a log axis gets
    unreadable tick labels and shows nothing a linear axis does not)."""
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")


def plot_training_curves(steps, stage_names: dict, runs_variants: dict | None = None):
    """Loss against tokens seen, one panel per stage (stacked, so that each is page-wide and its
    text readable), one line per run in its model's colour, marker and variant line style.
    ``steps``: rows of (run, variant, stage, tokens, loss). None when empty."""
    if steps is None or len(steps) == 0:
        return None
    stages = sorted(steps["stage"].unique())
    fig = new_figure(10, 3.0 * len(stages) + 0.6)
    axes = fig.subplots(len(stages), 1, squeeze=False)[:, 0]
    for ax, stage in zip(axes, stages):
        part = steps[steps["stage"] == stage]
        for run, rows in part.groupby("run", sort=False):
            style = model_style(run, rows["variant"].iloc[0] if "variant" in rows else None)
            ax.plot(rows["tokens"], rows["loss"], label=run, color=style["color"], linestyle=style["linestyle"],
                    marker=style["marker"], markevery=max(1, len(rows) // 8), markersize=5, alpha=0.85, lw=1.5)
        _log_if_wide(ax, part["loss"].tolist())
        ax.set_title(f"stage {stage}: {stage_names.get(int(stage), '')}", fontsize=12)
        ax.set_xlabel("tokens seen in this stage", fontsize=11)
        ax.set_ylabel("training loss", fontsize=11)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
    legend_outside(fig, axes, title="run", fontsize=10)
    return fig


def plot_run_losses(steps, stages, stage_names: dict):
    """One run's training loss against tokens, a panel per stage of ``stages`` that logged steps
    (side by side, log scale): what notebooks 01 and 02 show after training. ``steps``: the run's
    step records (``runs.metrics_frames``). None when none of those stages logged a step."""
    shown = steps[steps["stage"].isin(list(stages))] if len(steps) else steps
    ran = sorted(shown["stage"].unique()) if len(shown) else []
    if not ran:
        return None
    fig = new_figure(5.5 * len(ran), 3.6)
    for ax, stage in zip(fig.subplots(1, len(ran), squeeze=False)[0], ran):
        part = shown[shown["stage"] == stage]
        ax.plot(part["tokens"], part["loss"])
        ax.set(title=f"stage {stage}: {stage_names.get(int(stage), '')}", xlabel="tokens", ylabel="loss",
               yscale="log")
    return fig


# Above this many runs of more than one variant, one panel per variant: a single panel of 30+
# overlapping lines (the study grid) shows nothing.
SMALL_MULTIPLES_ABOVE = 12
_STAGE_SHORT = {"conversion": "conv.", "stage0": "st. 0", "stage1": "st. 1", "stage2": "st. 2", "stage3": "st. 3"}


def plot_validation(records, stage_order, teacher_perplexity: float | None = None):
    """Validation perplexity and KL after conversion and each stage, one line per run (model
    colour and marker, variant line style). ``records``: dicts with run, variant, after,
    perplexity, KL. A few runs share two panels, their points slightly offset so that equal
    values stay visible; many runs of several variants (the study grid) get one column per
    variant, the students of a variant side by side, perplexity above KL, shared y axes."""
    if not records:
        return None
    import pandas as pd

    df = pd.DataFrame(records)
    order = list(stage_order)
    variants = list(dict.fromkeys(df["variant"]))
    if df["run"].nunique() > SMALL_MULTIPLES_ABOVE and len(variants) > 1:
        return _validation_by_variant(df, order, variants, teacher_perplexity)
    runs = list(dict.fromkeys(df["run"]))
    fig = new_figure(13, 4.2)
    axes = fig.subplots(1, 2)
    for ax, col in zip(axes, ("perplexity", "KL")):
        for i, run in enumerate(runs):
            rows = df[df["run"] == run].copy()
            rows["x"] = rows["after"].map(order.index) + 0.06 * (i - (len(runs) - 1) / 2)
            rows = rows.sort_values("x")
            style = model_style(run, rows["variant"].iloc[0])
            ax.plot(rows["x"], rows[col], label=run, color=style["color"], marker=style["marker"],
                    linestyle=style["linestyle"], markersize=6, alpha=0.85)
        ax.set_xticks(range(len(order)), [f"after {a}" for a in order], fontsize=10)
        _log_if_wide(ax, df[col].tolist())
        ax.grid(alpha=0.3)
    if teacher_perplexity is not None:
        axes[0].axhline(teacher_perplexity, **{**model_style("teacher"), "marker": None}, ls="--", lw=1, label="teacher")
    axes[0].set_title("validation perplexity (lower is better)", fontsize=12)
    axes[1].set_title("per-token KL(teacher || student)", fontsize=12)
    legend_outside(fig, axes, title="run", fontsize=10)
    return fig


def _validation_by_variant(df, order, variants, teacher_perplexity, per_row: int = 4):
    """plot_validation's small multiples: per variant a perplexity panel above a KL panel, at most
    ``per_row`` variants a row; each student in its colour and marker (the legend names students)."""
    n_rows = -(-len(variants) // per_row)
    ppl = df["perplexity"].dropna()
    ppl = ppl[ppl > 0].tolist() + ([teacher_perplexity] if teacher_perplexity else [])
    kl = df["KL"].dropna().tolist()
    limits = {"perplexity": (min(ppl) / 1.5, max(ppl) * 1.5) if ppl else (1, 10),
              "KL": (0, max(kl) * 1.05) if kl else (0, 1)}
    cols = min(per_row, len(variants))
    fig = new_figure(3.4 * cols + 1.6, 5.2 * n_rows)
    grid = fig.subplots(2 * n_rows, cols, squeeze=False)
    for k in range(n_rows * cols):
        pair = grid[2 * (k // cols):2 * (k // cols) + 2, k % cols]
        if k >= len(variants):
            for ax in pair:
                ax.set_visible(False)
            continue
        part = df[df["variant"] == variants[k]]
        shown = [a for a in order if a in set(part["after"])]
        for ax, col in zip(pair, ("perplexity", "KL")):
            for run, rows in part.groupby("run", sort=False):
                rows = rows.assign(x=rows["after"].map(shown.index)).sort_values("x")
                style = model_style(run)
                ax.plot(rows["x"], rows[col], label=run.split("/")[0], color=style["color"], marker=style["marker"],
                        linestyle="-", markersize=5, alpha=0.85, lw=1.3)
            if col == "perplexity" and teacher_perplexity is not None:
                ax.axhline(teacher_perplexity, color="k", ls="--", lw=1, label="teacher")
            ax.set_xticks(range(len(shown)), [_STAGE_SHORT.get(a, a) for a in shown], fontsize=9)
            ax.set_xlim(-0.3, len(shown) - 0.7)
            # perplexity spans decades (1e5 at conversion to the teacher's ~30); KL is linear, since a
            # student that starts as the teacher (softmax: KL ~1e-9) would stretch a log axis over
            # ten decades. Every panel of a metric shares its limits, across rows too.
            if col == "perplexity":
                ax.set_yscale("log")
            ax.set_ylim(*limits[col])
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=9)
        pair[0].set_title(f"{variants[k]}", fontsize=11)
        if k % cols == 0:
            pair[0].set_ylabel("validation perplexity", fontsize=10)
            pair[1].set_ylabel("KL(teacher || student)", fontsize=10)
    legend_outside(fig, grid.ravel(), title="student", fontsize=10)
    return fig


ROOFLINE_CAPTION = ("Roofline tokens/s: the fastest a decode step could run if it only had to read every weight "
                    "and the whole cache/state once at the memory bandwidth measured in the same run "
                    "(bytes per step / bandwidth); the measured speed is below it.")


def plot_bench(df, teacher_limit: int | None = None) -> dict:
    """Decode speed (with its roofline), prefill speed and memory against context, log-2 x axis,
    one colour and marker per model; {file name: Figure}. A context where the students were
    measured and the teacher was not gets a note saying why."""
    out = {}
    if df is None or len(df) == 0:
        return out
    models = list(dict.fromkeys(df["model"]))
    dtype = ",".join(sorted(df["dtype"].astype(str).unique())) if "dtype" in df else "?"
    threads = df["threads"].iloc[0] if "threads" in df else "?"
    teacher_ctx = set(df[df["model"] == "teacher"]["context"]) if "teacher" in models else set()
    missing = sorted(set(df["context"]) - teacher_ctx) if teacher_ctx else []
    figures = {
        "decode_speed.png": [("decode_tok_s", "decode tokens/s"), ("roofline_tok_s", "roofline tokens/s")],
        "prefill_speed.png": [("prefill_tok_s", "prefill tokens/s")],
        "memory.png": [("state_mib", "cache / state MiB"), ("peak_rss_mib", "peak RSS MiB")],
    }
    for name, panels in figures.items():
        fig = new_figure(6.2 * len(panels) + 2, 4.6)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (col, label) in zip(axes, panels):
            if col not in df:
                ax.set_visible(False)
                continue
            for i, model in enumerate(models):
                rows = df[df["model"] == model].sort_values("context")
                style = model_style(model)
                # lines that coincide (GLA's roofline and xLSTM's) stay visible: open markers of
                # different shapes and sizes, transparency
                ax.plot(rows["context"], rows[col], label=model, color=style["color"], marker=style["marker"],
                        markersize=9 - 1.2 * (i % 4), markerfacecolor="none", markeredgewidth=1.6,
                        linestyle=style["linestyle"], lw=1.6, alpha=0.8)
            ax.set_xscale("log", base=2)
            if col == "state_mib":
                ax.set_yscale("log")
            ax.set_xlabel("context tokens (log 2)", fontsize=11)
            ax.set_ylabel(label, fontsize=11)
            ax.grid(alpha=0.3)
        legend_outside(fig, axes, title="model", fontsize=10)
        caption = f"{dtype}, {threads} threads."
        if missing:
            caption += (f" The teacher has no point at {', '.join(map(str, missing))} tokens: beyond its context "
                        f"limit ({teacher_limit or max(teacher_ctx)} tokens).")
        if name == "decode_speed.png":
            caption += " " + ROOFLINE_CAPTION
        fig.suptitle(f"{name[:-4].replace('_', ' ')}", fontsize=12)
        fig.text(0.01, -0.02, caption, fontsize=9, wrap=True, va="top")
        out[name] = fig
    return out
