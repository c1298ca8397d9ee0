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


# ---------------------------------------------------------------------------------------
# Attention-alignment explorer (teacher softmax maps vs students' materialised matrices)
# ---------------------------------------------------------------------------------------
class AttentionExplorer:
    """Teacher and student maps per (student, example, layer, head), computed lazily.

    As in stage 1, each student layer sees the *teacher's* input to that layer, so a map shows
    how well that mixer alone imitates the teacher's attention (errors do not compound across
    layers). ``distances`` gives the matrix-mixing distance per layer (``losses.matrix_mixing_loss``:
    Frobenius norm summed over heads), i.e. exactly what stage 1 minimises.
    """

    def __init__(self, teacher, tokenizer, students: dict, texts: list[str], max_tokens: int = 64):
        if not students:
            raise ValueError("AttentionExplorer needs at least one student: {name: model}.")
        if not texts:
            raise ValueError("AttentionExplorer needs at least one example text.")
        self.teacher, self.tokenizer, self.students = teacher, tokenizer, dict(students)
        self.inputs = [tokenizer(t, return_tensors="pt").input_ids[:, :max_tokens] for t in texts]
        self.num_layers = teacher.config.num_hidden_layers
        self.num_heads = teacher.config.num_attention_heads
        self._cache: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @torch.no_grad()
    def _layers(self, student: str, example: int):
        """All layers' (teacher map, student map) [H, T, T] for one student and example."""
        key = (student, example)
        if key not in self._cache:
            from .teacher import iter_layers

            model = self.students[student]
            maps = []
            for tr in iter_layers(self.teacher, self.inputs[example]):
                layer = model.model.layers[tr.index]
                x = layer.input_layernorm(tr.hidden_in.to(next(model.parameters()).dtype))
                a_s = layer.self_attn.mixing_matrix(x, tr.position_embeddings)
                maps.append((tr.attn[0].float(), a_s[0].float()))
            self._cache[key] = maps
        return self._cache[key]

    def maps(self, student: str, example: int, layer: int):
        return self._layers(student, example)[layer]

    def distances(self, student: str, example: int) -> np.ndarray:
        from .losses import matrix_mixing_loss

        return np.array([matrix_mixing_loss(t[None], s[None]).item() for t, s in self._layers(student, example)])

    def tokens(self, example: int) -> list[str]:
        return [t.replace("\u0120", " ") for t in self.tokenizer.convert_ids_to_tokens(self.inputs[example][0])]

    def figure(self, student: str, layer: int = 0, head: int = 0, example: int = 0):
        """The static view: maps side by side and the per-layer distance (for HTML export)."""
        a_t, a_s = self.maps(student, example, layer)
        fig = plot_maps_side_by_side(a_t[head], a_s[head], title=f"{student}: layer {layer}, head {head}, "
                                     f"||A_T - A_S||_F = {torch.linalg.matrix_norm(a_t[head] - a_s[head]).item():.3f}")
        d = self.distances(student, example)
        fig2, ax = plt.subplots(figsize=(11, 2.4))
        ax.bar(range(len(d)), d, color=["tab:orange" if i == layer else "tab:blue" for i in range(len(d))])
        ax.set_xlabel("layer"), ax.set_ylabel("matrix-mixing distance")
        ax.set_title(f"{student}: distance to the teacher's attention per layer (sum over heads)")
        fig2.tight_layout()
        return fig, fig2

    def widget(self):
        """ipywidgets controls (student, layer, head, example) over ``figure``."""
        import ipywidgets as w
        from IPython.display import display

        student = w.Dropdown(options=list(self.students), description="student")
        layer = w.IntSlider(0, 0, self.num_layers - 1, description="layer")
        head = w.IntSlider(0, 0, self.num_heads - 1, description="head")
        example = w.Dropdown(options=[(f"{i}: {self.tokenizer.decode(ids[0][:8])}...", i)
                                      for i, ids in enumerate(self.inputs)], description="example")
        out = w.Output()

        def redraw(*_):
            with out:
                out.clear_output(wait=True)
                for fig in self.figure(student.value, layer.value, head.value, example.value):
                    display(fig)
                    plt.close(fig)

        for control in (student, layer, head, example):
            control.observe(redraw, names="value")
        redraw()
        box = w.VBox([w.HBox([student, example]), w.HBox([layer, head]), out])
        box.controls = dict(student=student, layer=layer, head=head, example=example)
        box.output = out
        return box
