"""RetNet multi-scale retention (Sun et al. 2023).

S_t = gamma_h S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(d), with a static decay per head
gamma_h = 1 - 2^(-5-h) (h = 0..H-1, as RetNet and FLA's reference). Output: GroupNorm with one
group per head (per-head LayerNorm with per-channel affine), times the swish gate swish(W_g x),
then o_proj. The paper rotates q, k with xPos; here RoPE is option rope (default off, so the
decay alone carries position). The paper's doubled value width is not used: v keeps the
teacher's head_dim so the teacher's v_proj copies in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import HeadNorm, merge_heads
from .linear import Features, LinearMixer, scale_of
from .registry import register


@register
class RetNet(LinearMixer):
    name = "retnet"
    paper = "RetNet multi-scale retention (Sun et al. 2023)"
    decay = "static-scalar"
    matrix_note = "A_ij = gamma_h^(i-j) (q_i.k_j)/sqrt(d); o = A @ V exactly."

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        c = config
        self.llama_projections()
        self.g_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.out_norm = HeadNorm(c.num_heads, c.head_dim, kind="layer", eps=self.eps)

    def features(self, x, position_embeddings, state, new_state):
        q, k = self.heads(self.q_proj(x)), self.heads(self.k_proj(x), kv=True)
        q, k = self.rope(q, k, position_embeddings)
        b, h, t, _ = q.shape
        # static decays, computed in the working dtype (a float32 buffer would round them)
        log_gamma = torch.log1p(-(2.0 ** (-5.0 - torch.arange(h, dtype=q.dtype, device=q.device))))
        g = log_gamma.view(1, h, 1, 1).expand(b, h, t, 1)
        return Features(q=q * scale_of(self.head_dim), k=k, v=self.heads(self.v_proj(x), kv=True), g=g)

    def output(self, o, x):
        return self.o_proj(merge_heads(self.out_norm(o)) * F.silu(self.g_proj(x)))
