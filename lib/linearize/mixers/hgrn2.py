"""HGRN2 (Qin et al. 2024): a gated linear RNN with outer-product state expansion.

Forget gate f_t = sigmoid(W_f x + b_f) per channel, decay in log space g = logsigmoid(.); no key
projection: the input gate is tied to the forget gate, k_t = 1 - f_t (computed as -expm1(g)).
Query q = swish(W_q x) / sqrt(d) (the paper's output-gate-as-query), value from v_proj.
Output: RMSNorm over all heads, then o_proj. The layer-dependent lower bound on f is not used
(option lower_bound is not implemented; forget_bias sets the start instead).

Options (defaults): forget_bias 3.0 (sigmoid ~ 0.95), rope False.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import merge_heads
from .linear import Features, LinearMixer, scale_of
from .registry import register


@register
class HGRN2(LinearMixer):
    name = "hgrn2"
    paper = "HGRN2 (Qin et al. 2024)"
    option_names = ("forget_bias",)
    has_key = False
    decay = "dynamic-channel"
    matrix_note = "A_ij = sum_d q_id (1 - f_jd) prod_{j<l<=i} f_ld; o = A @ V exactly."
    copy_skips = {"k_proj": "HGRN2 has no key: k = 1 - f, f from its own forget-gate projection f_proj"}

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        c = config
        self.llama_projections(k=False)
        self.f_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=True)
        nn.init.constant_(self.f_proj.bias, float(self.option("forget_bias", 3.0)))
        self.out_norm = nn.RMSNorm(c.num_heads * c.head_dim, eps=self.eps)

    def features(self, x, position_embeddings, state, new_state):
        q = self.heads(F.silu(self.q_proj(x)))
        g = self.heads(F.logsigmoid(self.f_proj(x)))
        k = -torch.expm1(g)  # 1 - f without cancellation when f is close to 1
        q, k = self.rope(q, k, position_embeddings)
        return Features(q=q * scale_of(self.head_dim), k=k, v=self.heads(self.v_proj(x), kv=True), g=g)

    def output(self, o, x):
        return self.o_proj(self.out_norm(merge_heads(o)))
