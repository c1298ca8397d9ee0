"""Closed-form readout fit: each student mixer's ``o_proj`` as the least-squares map to the teacher.

Why. A converted student keeps the teacher's embeddings, norms and MLPs, and (with QKV copy)
its q/k/v/o projections, but the mixer in between is new: its per-head outputs are linear
attention, gated and normalised in ways the teacher's ``o_proj`` was never trained to read.
``benchmarks/conversion_gap.py`` measured the result: most students start with validation
perplexity 1e4-1e5 against the teacher's ~48, and the short CPU presets cannot train that away.

What. Every mixer ends in ``o_proj`` (a bias-free Linear), so with the teacher's attention
output Y (what its ``o_proj`` writes into the residual stream) and the student's ``o_proj``
input Z on the same teacher-forced layer input, the best linear readout has a closed form.
We solve, per layer, the ridge problem

    W = argmin_W ||Z W^T - Y||^2 + lam * s * ||W - W0||^2,   s = trace(Z^T Z) / n_features,

i.e. (Z^T Z + lam s I) W^T = Z^T Y + lam s W0^T, shrinking towards the current weight W0 (the
teacher's copied ``o_proj`` under QKV copy) rather than towards zero: with few calibration
tokens the fit stays near what was copied, with many it follows the data. ``s`` makes
``lam`` independent of the features' scale. Only sufficient statistics (Z^T Z, Z^T Y, Y^T Y:
[F, F], [F, hidden], [hidden, hidden] in float64) are kept, so the calibration set can be as
long as one likes at a fixed memory cost. Every layer reads the teacher's own input to that
layer (teacher forcing), so the layers are fitted independently of one another.

This is the closed-form version of what stage 2 (hidden-to-hidden alignment) does by SGD for
one linear map; it is an extension, not part of the source study, and off unless asked for
(``readout_fit_tokens`` in the params, ``--readout-fit`` in benchmarks/conversion_gap.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ReadoutFit:
    layer: int
    tokens: int
    rel_error_before: float  # ||Z W0^T - Y||^2 / ||Y||^2 on the calibration tokens
    rel_error_after: float  # the same with the fitted W


class _Moments:
    """Running Z^T Z, Z^T Y, Y^T Y (float64) for one layer."""

    def __init__(self):
        self.zz = self.zy = self.yy = None
        self.n = 0

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z = z.reshape(-1, z.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        if self.zz is None:
            self.zz, self.zy, self.yy = z.T @ z, z.T @ y, y.T @ y
        else:
            self.zz += z.T @ z
            self.zy += z.T @ y
            self.yy += y.T @ y
        self.n += z.shape[0]

    def sq_error(self, w: torch.Tensor) -> float:
        """||Z W^T - Y||^2 from the moments: tr(W ZZ W^T) - 2 tr(W ZY) + tr(YY)."""
        w = w.double()
        return float(torch.einsum("hf,fg,hg->", w, self.zz, w) - 2 * torch.einsum("hf,fh->", w, self.zy)
                     + self.yy.trace())


def solve_readout(zz: torch.Tensor, zy: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """W [out, in] solving (ZZ + lam s I) W^T = ZY + lam s W0^T (s = mean diagonal of ZZ)."""
    f = zz.shape[0]
    s = float(zz.diagonal().mean().clamp_min(1e-30))
    a = zz + ridge * s * torch.eye(f, dtype=zz.dtype, device=zz.device)
    b = zy + ridge * s * w0.double().T
    # Cholesky: a is symmetric positive definite for ridge > 0 (and Z^T Z is PSD)
    return torch.cholesky_solve(b, torch.linalg.cholesky(a)).T


@torch.no_grad()
def fit_readouts(
    student: nn.Module,
    teacher: nn.Module,
    blocks: torch.Tensor,
    ridge: float = 1e-2,
    batch_size: int = 4,
    progress: bool = False,
) -> list[ReadoutFit]:
    """Refit every student layer's ``self_attn.o_proj`` in place from teacher-forced moments.

    ``blocks``: token ids [N, T] (the calibration set, e.g. training blocks). Returns one
    ``ReadoutFit`` per layer with the relative error before and after on those tokens.
    """
    from .teacher import iter_layers

    if ridge <= 0:
        raise ValueError(f"ridge must be > 0 (it keeps the solve well posed), got {ridge}")
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty [N, T] tensor of token ids, got shape {tuple(blocks.shape)}")
    t_layers, s_layers = teacher.model.layers, student.model.layers
    if len(t_layers) != len(s_layers):
        raise ValueError(f"teacher has {len(t_layers)} layers, student {len(s_layers)}")
    for i, layer in enumerate(s_layers):
        proj = getattr(layer.self_attn, "o_proj", None)
        if not isinstance(proj, nn.Linear) or proj.bias is not None:
            raise TypeError(f"layer {i}: the student mixer has no bias-free nn.Linear o_proj to refit")

    moments = [_Moments() for _ in s_layers]
    captured: dict[str, torch.Tensor] = {}
    hooks = [t.self_attn.o_proj.register_forward_hook(
        lambda _m, _i, out, key=f"y{i}": captured.__setitem__(key, out)) for i, t in enumerate(t_layers)]
    hooks += [s.self_attn.o_proj.register_forward_pre_hook(
        lambda _m, inp, key="z": captured.__setitem__(key, inp[0])) for s in s_layers]
    was_training = student.training
    student.eval()
    device = next(teacher.parameters()).device
    batches = blocks.split(batch_size)
    if progress:
        from tqdm import tqdm  # text, not a widget: under papermill a widget bar never reaches the log

        batches = tqdm(batches, desc="readout fit", unit="batch")
    try:
        for ids in batches:
            ids = ids.to(device)
            for trace in iter_layers(teacher, ids, with_attention=False):
                layer = s_layers[trace.index]
                x = layer.input_layernorm(trace.hidden_in)
                layer.self_attn(x, position_embeddings=trace.position_embeddings, keep_state=False)
                moments[trace.index].add(captured.pop("z"), captured.pop(f"y{trace.index}"))
    finally:
        for h in hooks:
            h.remove()
        student.train(was_training)

    report = []
    for i, (layer, m) in enumerate(zip(s_layers, moments)):
        proj = layer.self_attn.o_proj
        w0 = proj.weight.detach()
        total = float(m.yy.trace().clamp_min(1e-30))
        before = m.sq_error(w0) / total
        w = solve_readout(m.zz, m.zy, w0, ridge)
        proj.weight.copy_(w.to(proj.weight.dtype))
        report.append(ReadoutFit(i, m.n, before, m.sq_error(w) / total))
    return report
