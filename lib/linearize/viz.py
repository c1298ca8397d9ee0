"""Plots shared by the notebooks: attention heads, maps side by side, curves."""
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


def plot_maps_side_by_side(teacher_map, student_map, title: str = "", tokens: list[str] | None = None):
    """Teacher map, student map and their difference for one head. Maps: [T, T]."""
    t, s = _as_numpy(teacher_map), _as_numpy(student_map)
    diff = s - t
    lim = max(abs(diff).max(), 1e-9)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    vmax = max(t.max(), s.max(), 1e-9)
    for ax, m, name, kw in (
        (axes[0], t, "teacher (softmax)", dict(cmap="viridis", vmin=0, vmax=vmax)),
        (axes[1], s, "student (materialised)", dict(cmap="viridis", vmin=min(0, s.min()), vmax=vmax)),
        (axes[2], diff, "student - teacher", dict(cmap="RdBu_r", vmin=-lim, vmax=lim)),
    ):
        im = ax.imshow(m, **kw)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
