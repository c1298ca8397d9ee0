"""The attention-alignment explorer: teacher softmax maps beside a student's materialised
mixing matrices, per (student, example, layer, head), computed lazily and drawn as PNG bytes
into ``ipywidgets.Image`` (the figures and styles come from :mod:`linearize.viz`)."""
from __future__ import annotations

import numpy as np
import torch

from .viz import _as_numpy, model_style, new_figure, plot_maps_side_by_side, png_bytes, quiet_loading


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

            with quiet_loading():
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
        return [t.replace("\u0120", " ").replace("\u010a", "\n")
                for t in self.tokenizer.convert_ids_to_tokens(self.inputs[example][0])]

    def maps_figure(self, student: str, layer: int = 0, head: int = 0, example: int = 0):
        a_t, a_s = self.maps(student, example, layer)
        norm = torch.linalg.matrix_norm(a_t[head] - a_s[head]).item()
        return plot_maps_side_by_side(a_t[head], a_s[head], tokens=self.tokens(example),
                                      title=f"{student}: layer {layer}, head {head}, example {example}; "
                                            f"||A_teacher - A_student||_F = {norm:.3f}")

    def distance_figure(self, student: str, layer: int = 0, example: int = 0):
        d = self.distances(student, example)
        fig = new_figure(11, 2.8)
        ax = fig.subplots()
        color = model_style(student)["color"]
        ax.bar(range(len(d)), d, color=[color if i == layer else "lightgray" for i in range(len(d))],
               edgecolor="black", linewidth=0.5)
        ax.set_xticks(range(len(d)))
        ax.set_xlabel("layer (shown layer in colour)", fontsize=10)
        ax.set_ylabel("matrix-mixing distance", fontsize=10)
        ax.set_title(f"{student}, example {example}: distance to the teacher's attention per layer "
                     "(Frobenius norm, summed over heads)", fontsize=10)
        return fig

    def figure(self, student: str, layer: int = 0, head: int = 0, example: int = 0):
        """The view for one choice of controls: (maps figure, per-layer distance figure)."""
        return self.maps_figure(student, layer, head, example), self.distance_figure(student, layer, example)

    def grid_figure(self, student: str, layers=None, heads=None, example: int = 0):
        """A static grid of teacher and student maps for a few layers and heads (first, middle,
        last by default), for a page that is read without a kernel."""
        layers = sorted({0, self.num_layers // 2, self.num_layers - 1}) if layers is None else list(layers)
        heads = sorted({0, self.num_heads // 2}) if heads is None else list(heads)
        cols = [(layer, head) for layer in layers for head in heads]
        fig = new_figure(2.6 * len(cols) + 1.2, 5.6)
        axes = fig.subplots(2, len(cols), squeeze=False)
        im = None
        for j, (layer, head) in enumerate(cols):
            a_t, a_s = self.maps(student, example, layer)
            t, s = _as_numpy(a_t[head]), _as_numpy(a_s[head])
            vmax = max(float(t.max()), 1e-9)
            for i, (m, who) in enumerate(((t, "teacher"), (s, "student"))):
                ax = axes[i][j]
                im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"layer {layer}, head {head}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"{who}\nquery", fontsize=9)
                if i == 1:
                    ax.set_xlabel("key", fontsize=9)
        fig.colorbar(im, ax=axes, shrink=0.8, extend="both", label="weight (each column: teacher's scale)")
        fig.suptitle(f"{student}, example {example}: teacher (top) and student (bottom) maps", fontsize=11)
        return fig

    def widget(self):
        """ipywidgets controls (student, example, layer, head) over two ``ipywidgets.Image``s.

        Each redraw renders PNG bytes from fresh Agg figures and sets them on the images, so
        what the browser shows is exactly those bytes; an error shows in the status line."""
        import ipywidgets as w

        student = w.Dropdown(options=list(self.students), description="student")
        layer = w.IntSlider(0, 0, self.num_layers - 1, description="layer")
        head = w.IntSlider(0, 0, self.num_heads - 1, description="head")
        example = w.Dropdown(options=[(f"{i}: {self.tokenizer.decode(ids[0][:8])}...", i)
                                      for i, ids in enumerate(self.inputs)], description="example")
        maps_image = w.Image(format="png", layout=w.Layout(width="100%", max_width="1200px"))
        distance_image = w.Image(format="png", layout=w.Layout(width="100%", max_width="1100px"))
        status = w.HTML()

        def redraw(*_):
            args = (student.value, layer.value, head.value, example.value)
            status.value = "drawing..."
            try:
                maps_fig, distance_fig = self.figure(*args)
                maps_image.value = png_bytes(maps_fig)
                distance_image.value = png_bytes(distance_fig)
                status.value = ""
            except Exception as err:  # shown where the user looks, not in the kernel's log
                status.value = f"<b>could not draw {args}:</b> {type(err).__name__}: {err}"
                raise

        for control in (student, layer, head, example):
            control.observe(redraw, names="value")
        redraw()
        box = w.VBox([w.HBox([student, example]), w.HBox([layer, head]), status, maps_image, distance_image])
        # CSS classes name the explorer and its parts on the page (a stylesheet or a browser test
        # finds them by name instead of by position among the notebook's widgets)
        box.add_class("linearize-explorer")
        for name, part in dict(student=student, example=example, layer=layer, head=head, status=status,
                               maps=maps_image, distance=distance_image).items():
            part.add_class(f"linearize-explorer-{name}")
        box.controls = dict(student=student, layer=layer, head=head, example=example)
        box.images = dict(maps=maps_image, distance=distance_image)
        box.status = status
        return box
