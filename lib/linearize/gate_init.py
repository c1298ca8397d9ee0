"""Decay gates initialised from the teacher: each head's retention from how the teacher's
attention mass falls off with distance (an extension, not part of the source study).

Why. A converted student's decay gates start from one constant for every head and layer
(``forget_bias``), while the teacher's heads range from ones that read the previous token to
ones that read the whole context. A gated student whose head h forgets at the wrong rate
cannot reproduce head h's output however its o_proj is refitted.

What. On a few calibration blocks, for layer l and query head h, the teacher's causal softmax
map A gives each query i a mean look-back distance  m_i = sum_j A_ij (i - j).  The first key
is left out and each row renormalised, because Llama-style models park attention mass on the
first position (an "attention sink") that says nothing about how fast a head forgets. A
geometric kernel w_d proportional to gamma^d over the d = 0..i-1 reachable distances has the
mean  E_gamma[d | i] = sum_d d gamma^d / sum_d gamma^d;  gamma_lh is the retention whose mean,
averaged over the same queries, equals the teacher's (found by bisection: the mean grows
monotonically with gamma).

Each gated mixer then gets a per-head bias that makes its data-independent decay gamma_lh
(the data-dependent part x W of every gate is left as converted; with it at zero the decay is
gamma_lh exactly):
  gla, metala: log alpha = logsigmoid(b)/tau per key channel  -> b = logit(gamma^tau)
  hgrn2:       log f = logsigmoid(b) per channel               -> b = logit(gamma)
  xlstm:       log f = logsigmoid(b) per head (forget gate)    -> b = logit(gamma)
  mamba2:      log decay = -exp(A_log) softplus(b)             -> b = softplus^-1(-log gamma / exp(A_log))
RetNet's decays are fixed by its definition (1 - 2^(-5-h)); DeltaNet, Hedgehog, ReBased and the
softmax student have no decay: they are left unchanged (``init_gates`` says which it touched).
"""
from __future__ import annotations

import math

import torch
from torch import nn


# The students whose decay gates ``init_gates`` sets (the others have none, or fixed ones).
GATED = ("gla", "metala", "hgrn2", "xlstm", "mamba2")


def geometric_mean_distance(gamma: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """E[d] under w_d proportional to gamma^d, d = 0..reach-1, for each reach (float64).

    ``gamma`` [...] broadcasts against ``reach`` [R]; returns [..., R]."""
    dmax = int(reach.max())
    d = torch.arange(dmax, dtype=torch.float64)
    w = gamma.double().unsqueeze(-1).clamp(1e-12, 1 - 1e-12) ** d  # [..., D]
    mask = d.unsqueeze(0) < reach.double().unsqueeze(-1)  # [R, D]
    w = w.unsqueeze(-2) * mask  # [..., R, D]
    return (w * d).sum(-1) / w.sum(-1)


@torch.no_grad()
def teacher_mean_distance(teacher: nn.Module, blocks: torch.Tensor, batch_size: int = 4,
                          skip_first: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(m [L, H, T], counts [T]): the teacher's mean look-back distance per layer, head and query
    position (averaged over the blocks), with the first ``skip_first`` keys left out."""
    from .teacher import iter_layers

    n_layers = len(teacher.model.layers)
    t = blocks.shape[1]
    total, rows = None, 0
    device = next(teacher.parameters()).device
    i = torch.arange(t, device=device, dtype=torch.float64)
    dist = (i.view(-1, 1) - i.view(1, -1)).clamp_min(0)  # [T, T]
    for ids in blocks.split(batch_size):
        ids = ids.to(device)
        for trace in iter_layers(teacher, ids, with_attention=True):
            a = trace.attn.double()[..., skip_first:]  # [B, H, T, T - s]
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
            m = (a * dist[:, skip_first:]).sum(-1).sum(0)  # [H, T]
            if total is None:
                total = torch.zeros(n_layers, *m.shape, dtype=torch.float64, device=device)
            total[trace.index] += m
        rows += ids.shape[0]
    return (total / rows).cpu(), torch.full((t,), rows)


def fit_retention(mean_distance: torch.Tensor, skip_first: int = 1, tol: float = 1e-10) -> torch.Tensor:
    """gamma [...] whose geometric kernel has the teacher's mean distance averaged over queries.

    ``mean_distance`` [..., T] per query position; queries i with fewer than 2 reachable keys
    (i - skip_first + 1 < 2) carry no information and are ignored."""
    t = mean_distance.shape[-1]
    reach = torch.arange(t) - skip_first + 1  # keys j = skip_first..i
    use = reach >= 2
    target = mean_distance[..., use].mean(-1)
    lo = torch.zeros_like(target)
    hi = torch.ones_like(target)
    for _ in range(60):  # bisection: E_gamma[d] is increasing in gamma
        mid = (lo + hi) / 2
        val = geometric_mean_distance(mid, reach[use]).mean(-1)
        low = val < target
        lo = torch.where(low, mid, lo)
        hi = torch.where(low, hi, mid)
        if float((hi - lo).max()) < tol:
            break
    return ((lo + hi) / 2).clamp(1e-4, 1 - 1e-6)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def _per_channel(gamma_h: torch.Tensor, channels: int) -> torch.Tensor:
    return gamma_h.repeat_interleave(channels)


@torch.no_grad()
def init_gates(student: nn.Module, gammas: torch.Tensor) -> list[str]:
    """Set every gated mixer's decay bias from ``gammas`` [L, H]; returns the mixers changed."""
    changed = []
    for layer_idx, layer in enumerate(student.model.layers):
        mixer = layer.self_attn
        name = getattr(mixer, "name", type(mixer).__name__)
        g = gammas[layer_idx].double()
        if name in ("gla", "metala"):
            lin = mixer.gk_proj[1] if isinstance(mixer.gk_proj, nn.Sequential) else mixer.gk_proj
            bias = _logit(g ** mixer.tau)
            lin.bias.copy_(_per_channel(bias, lin.bias.numel() // g.numel()).to(lin.bias.dtype))
        elif name == "hgrn2":
            bias = _logit(g)
            mixer.f_proj.bias.copy_(_per_channel(bias, mixer.f_proj.bias.numel() // g.numel()).to(mixer.f_proj.bias.dtype))
        elif name == "xlstm":
            mixer.fgate.bias.copy_(_logit(g).to(mixer.fgate.bias.dtype))
        elif name == "mamba2":
            dt = -torch.log(g) / mixer.A_log.double().exp()
            mixer.dt_bias.copy_(torch.log(torch.expm1(dt.clamp_min(1e-8))).to(mixer.dt_bias.dtype))
        else:
            continue
        changed.append(f"layer {layer_idx}: {name}")
    return changed


@torch.no_grad()
def decay_of(mixer: nn.Module) -> torch.Tensor | None:
    """The data-independent per-head retention a gated mixer has now (what ``init_gates`` set),
    read back through the mixer's own gate formula; None for a mixer without such a gate."""
    import torch.nn.functional as F

    name = getattr(mixer, "name", "")
    h = mixer.config.num_heads
    if name in ("gla", "metala"):
        lin = mixer.gk_proj[1] if isinstance(mixer.gk_proj, nn.Sequential) else mixer.gk_proj
        return (F.logsigmoid(lin.bias.double()) / mixer.tau).view(h, -1).mean(-1).exp()
    if name == "hgrn2":
        return F.logsigmoid(mixer.f_proj.bias.double()).view(h, -1).mean(-1).exp()
    if name == "xlstm":
        return torch.sigmoid(mixer.fgate.bias.double())
    if name == "mamba2":
        return torch.exp(-mixer.A_log.double().exp() * F.softplus(mixer.dt_bias.double()))
    return None


def teacher_retention(teacher: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """gamma [L, H] of the teacher on ``blocks`` (see the module docstring)."""
    m, _ = teacher_mean_distance(teacher, blocks, batch_size)
    return fit_retention(m)


def half_life(gamma: torch.Tensor) -> torch.Tensor:
    """Tokens until a retention gamma has halved a memory: log(1/2) / log(gamma)."""
    return math.log(0.5) / torch.log(gamma)
