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

import torch
import torch.nn.functional as F
from torch import nn

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

    def feature_map(self, x):
        x = F.layer_norm(x, x.shape[-1:]) * self.gamma.to(x.dtype) + self.beta.to(x.dtype)
        # rows of the upper triangle of x x^T: x_i * [x_i, sqrt2 x_{i+1}, ..., sqrt2 x_{d-1}].
        # Slices and a cat, not a gather: a gather's backward (index_put) was 30% of the time.
        y = x * math.sqrt(2.0)
        return torch.cat([x[..., i:i + 1] * torch.cat([x[..., i:i + 1], y[..., i + 1:]], -1)
                          for i in range(x.shape[-1])], dim=-1)

    def features(self, x, position_embeddings, state, new_state):
        q, k = self.heads(self.q_proj(x)), self.heads(self.k_proj(x), kv=True)
        q, k = self.rope(q, k, position_embeddings)
        s = scale_of(self.head_dim)
        # (s q~).k~ squared: the scale goes in before squaring, as FLA's parallel_rebased
        phi_q = self.feature_map(q) * s * s
        return Features(q=phi_q, k=self.feature_map(k), v=self.heads(self.v_proj(x), kv=True))
