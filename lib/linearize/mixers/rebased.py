"""ReBased (Aksenov et al. 2024): linear attention with a learned quadratic kernel.

phi(x) = (gamma * LN(x) + beta)^(x2): the head vector is normalised (LayerNorm without affine),
given a learned affine (gamma, beta, shared by q and k), and mapped to its quadratic features,
so phi(q).phi(k) = (s q~ . k~)^2 with s = 1/sqrt(d). The features are the upper triangle of
x x^T with off-diagonal entries times sqrt(2): d(d+1)/2 of them (2080 for d = 64), the same
kernel as the full outer product at half the width. The kernel runs on the full head dim (not
FLA's 16-dim feature projection) so the teacher's q_proj/k_proj copy in. Normalised:
o_i = sum_j K_ij v_j / (sum_j K_ij + eps). Output: o_proj.

Options (defaults): norm_eps 1e-6 (the normaliser's eps), rope False.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .linear import Features, LinearMixer, scale_of
from .registry import register


@register
class ReBased(LinearMixer):
    name = "rebased"
    paper = "ReBased (Aksenov et al. 2024)"
    normalize = True
    decay = "none"
    matrix_note = ("A_ij = (s q~_i.k~_j)^2 / (sum_{l<=i} (s q~_i.k~_l)^2 + eps) for j <= i: the row-normalised "
                   "quadratic kernel; o = A @ V exactly (the normaliser depends on q, k only).")

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        d = config.head_dim
        self.llama_projections()
        self.gamma = nn.Parameter(torch.ones(d))
        self.beta = nn.Parameter(torch.zeros(d))
        self.key_dim = d * (d + 1) // 2

    def normed(self, x):
        """gamma * LN(x) + beta: the head vector before its quadratic features."""
        return F.layer_norm(x, x.shape[-1:]) * self.gamma.to(x.dtype) + self.beta.to(x.dtype)

    def feature_map(self, x):
        x = self.normed(x)
        # rows of the upper triangle of x x^T: x_i * [x_i, sqrt2 x_{i+1}, ..., sqrt2 x_{d-1}].
        # Slices and a cat, not a gather: a gather's backward (index_put) was 30% of the time;
        # an outer product + index_select with a hand-written backward took 3x the CPU time.
        y = x * math.sqrt(2.0)
        return torch.cat([x[..., i:i + 1] * torch.cat([x[..., i:i + 1], y[..., i + 1:]], -1)
                          for i in range(x.shape[-1])], dim=-1)

    def features(self, x, position_embeddings, state, new_state):
        q, k = self.heads(self.q_proj(x)), self.heads(self.k_proj(x), kv=True)
        q, k = self.rope(q, k, position_embeddings)
        s = scale_of(self.head_dim)
        # (s q~).k~ squared: the scale goes in before squaring, as FLA's parallel_rebased
        phi_q = self.feature_map(q) * s * s
        qn, kn = self.normed(q), self.normed(k)
        return _QuadFeatures(q=phi_q, k=self.feature_map(k),
                             v=self.heads(self.v_proj(x), kv=True), q_low=qn * s, k_low=kn)

    def _run(self, f, mode, state):
        # the chunked form's intra-chunk weights (s q~.k~)^2 in the head dim (64) rather than as
        # a dot product of 2080 features; the recurrence and the state still use the features
        if mode != "chunk":
            return super()._run(f, mode, state)
        o, s = kernels.gated_attention(f.q, f.k, f.v, None, mode=mode, chunk_size=self.config.chunk_size,
                                       backend=self.config.backend,
                                       initial_state=None if state is None else state["S"],
                                       normalize=True, eps=self.eps, square_qk=(f.q_low, f.k_low))
        return o, {"S": s}


@dataclass
class _QuadFeatures(Features):
    q_low: torch.Tensor | None = None  # s * q~ [B, H, T, d]: phi_q . phi_k = (q_low . k_low)^2
    k_low: torch.Tensor | None = None  # k~ [B, H, T, d]
