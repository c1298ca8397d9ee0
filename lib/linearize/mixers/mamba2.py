"""Mamba-2 (Dao & Gu 2024), the SSD layer, in attention terms.

h_t = exp(dt_t A_h) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D_h x_t, with
dt_t = softplus(W_dt x + dt_bias) per head, A_h = -exp(A_log_h) (a scalar decay per head and
step), the skip D_h. In attention terms q = C (q_proj), k = dt * B (k_proj), v = x (v_proj):
B and x use the teacher's H_kv groups, repeated to the heads, as Mamba-2's B/C groups. x, B and
C pass the causal short convolution with SiLU (conv_size 4). Output: gated RMSNorm
RMSNorm(y * silu(z)) with z = W_z x, normalised per group as in official Mamba-2 (its
RMSNormGated with group_size = d_ssm / ngroups; transformers' Mamba2Mixer does the same): the
H x P channels are split into ``norm_groups`` consecutive groups (default H_kv, the B/C group
count), each divided by its own root mean square; then o_proj. No 1/sqrt(d) scale (SSD has none).
Mamba-2's single fused in_proj is split into named projections so the teacher's copy in.

Options (defaults, Mamba-2's): dt_min 0.001, dt_max 0.1 (dt initialised log-uniformly between
them through dt_bias = softplus^-1(dt)), a_init_range (1, 16) for -A, D init 1.0, conv_size 4,
norm_groups H_kv (1 normalises all H x P channels together, as this module did before the
per-group fix; students trained then need ``norm_groups: 1`` to compute what they learnt).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import merge_heads
from .linear import Features, LinearMixer, inverse_softplus
from .registry import register


@register
class Mamba2(LinearMixer):
    name = "mamba2"
    paper = "Mamba-2 SSD (Dao & Gu 2024)"
    option_names = ("dt_min", "dt_max", "a_init_range", "d_init", "norm_groups", *LinearMixer.CONV_OPTIONS)
    decay = "dynamic-scalar"
    matrix_note = ("A_ij = (C_i.B_j) dt_j exp(sum_{j<l<=i} dt_l A_h) + D_h [i == j]: the D skip sits on the "
                   "diagonal, so y (before gating/norm) = A @ x exactly.")

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        c = config
        h = c.num_heads
        self.llama_projections()
        self.z_proj = nn.Linear(c.hidden_size, h * c.head_dim, bias=False)
        self.dt_proj = nn.Linear(c.hidden_size, h, bias=False)
        for name, n in (("q", h), ("k", c.num_kv_heads), ("v", c.num_kv_heads)):
            self.add_conv(name, n * c.head_dim)
        dt_min, dt_max = float(self.option("dt_min", 1e-3)), float(self.option("dt_max", 0.1))
        dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(1e-4)
        self.dt_bias = nn.Parameter(inverse_softplus(dt))
        lo, hi = self.option("a_init_range", (1.0, 16.0))
        self.A_log = nn.Parameter(torch.empty(h).uniform_(lo, hi).log())
        self.D = nn.Parameter(torch.full((h,), float(self.option("d_init", 1.0))))
        self.out_norm = GroupRMSNorm(h * c.head_dim, int(self.option("norm_groups", c.num_kv_heads)), self.eps)

    def features(self, x, position_embeddings, state, new_state):
        q = self.heads(self.conv("q", self.q_proj(x), state, new_state))
        k = self.heads(self.conv("k", self.k_proj(x), state, new_state), kv=True)
        v = self.heads(self.conv("v", self.v_proj(x), state, new_state), kv=True)
        q, k = self.rope(q, k, position_embeddings)
        dt = F.softplus(self.gate_heads(self.dt_proj(x)) + self.dt_bias.view(1, -1, 1))  # [B,H,T]
        g = (dt * -self.A_log.exp().view(1, -1, 1)).unsqueeze(-1)
        diag = self.D.to(x.dtype).view(1, -1, 1).expand_as(dt)
        return Features(q=q, k=k * dt.unsqueeze(-1), v=v, g=g, diag=diag)

    def output(self, o, x):
        return self.o_proj(self.out_norm(merge_heads(o) * F.silu(self.z_proj(x))))


class GroupRMSNorm(nn.Module):
    """RMSNorm over ``groups`` consecutive equal slices of the last dimension, one weight per
    channel: Mamba-2's grouped norm. ``groups=1`` is ``nn.RMSNorm(channels)``. The parameter is
    named ``weight`` like nn.RMSNorm's, so state dicts of either load into the other."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"norm_groups={groups} must be >= 1 and divide the {channels} output channels")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:  # exactly what nn.RMSNorm computes
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        size = x.shape[-1] // self.groups
        return F.rms_norm(x.unflatten(-1, (self.groups, size)), (size,), None, self.eps).flatten(-2) * self.weight
