"""Gated Linear Attention (Yang et al. 2023).

S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(d), with a data-dependent decay
per key channel alpha_t = sigmoid(x W_1 W_2 + b)^(1/tau): a low-rank (rank 16) gate projection and
the temperature tau = 16 ("gate_logit_normalizer"), computed as log alpha = logsigmoid(.)/tau.
Output: per-head RMSNorm times the swish output gate swish(W_g x), then o_proj.

Options (defaults): forget_bias 3.0 (the gate bias b; per-step retention sigmoid(3)^(1/16) =
0.997), gate_low_rank_dim 16, gate_logit_normalizer 16, rope False.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .common import HeadNorm, merge_heads
from .linear import Features, LinearMixer, scale_of
from .registry import register


@register
class GLA(LinearMixer):
    name = "gla"
    paper = "Gated Linear Attention (Yang et al. 2023)"
    option_names = ("gate_low_rank_dim", "forget_bias", "gate_logit_normalizer")
    decay = "dynamic-channel"
    matrix_note = "A_ij = sum_d q_id k_jd prod_{j<l<=i} alpha_ld (q scaled by 1/sqrt(d)); o = A @ V exactly."

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        c = config
        self.llama_projections()
        rank = int(self.option("gate_low_rank_dim", 16))
        self.gk_proj = nn.Sequential(nn.Linear(c.hidden_size, rank, bias=False),
                                     nn.Linear(rank, c.num_heads * c.head_dim, bias=True))
        nn.init.constant_(self.gk_proj[1].bias, float(self.option("forget_bias", 3.0)))
        self.tau = float(self.option("gate_logit_normalizer", 16.0))
        self.g_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.out_norm = HeadNorm(c.num_heads, c.head_dim, kind="rms", eps=self.eps)

    def features(self, x, position_embeddings, state, new_state):
        q, k = self.heads(self.q_proj(x)), self.heads(self.k_proj(x), kv=True)
        q, k = self.rope(q, k, position_embeddings)
        g = self.heads(F.logsigmoid(self.gk_proj(x)) / self.tau)
        return Features(q=q * scale_of(self.head_dim), k=k, v=self.heads(self.v_proj(x), kv=True), g=g)

    def output(self, o, x):
        return self.o_proj(merge_heads(self.out_norm(o)) * F.silu(self.g_proj(x)))
