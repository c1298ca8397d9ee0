"""DeltaNet (Schlag et al. 2021; chunked training as Yang et al. 2024).

S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t: the state is corrected
towards v_t by a delta-rule step of size beta_t = sigmoid(W_b x) per head. q, k, v pass causal
short convolutions with SiLU (conv_size 4); q and k are L2-normalised (so the update is a
contraction) and q is scaled by 1/sqrt(d). Output: per-head RMSNorm, optionally times a swish
output gate (option use_gate, default False as FLA's DeltaNet), then o_proj.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .common import HeadNorm, l2_normalize, merge_heads
from .linear import Features, LinearMixer, scale_of
from .registry import register


@register
class DeltaNet(LinearMixer):
    name = "deltanet"
    paper = "DeltaNet (Schlag et al. 2021; Yang et al. 2024)"
    family = "delta"
    option_names = ("use_gate", *LinearMixer.CONV_OPTIONS)
    decay = "delta"
    matrix_note = ("A = tril(Q K^T) (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta) (q, k L2-normalised, "
                   "q / sqrt(d)); o = A @ V exactly for the given q, k, beta.")

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        c = config
        self.llama_projections()
        self.add_conv("q", c.num_heads * c.head_dim)
        self.add_conv("k", c.num_kv_heads * c.head_dim)
        self.add_conv("v", c.num_kv_heads * c.head_dim)
        self.b_proj = nn.Linear(c.hidden_size, c.num_heads, bias=False)
        self.use_gate = bool(self.option("use_gate", False))
        if self.use_gate:
            self.g_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.out_norm = HeadNorm(c.num_heads, c.head_dim, kind="rms", eps=self.eps)

    def features(self, x, position_embeddings, state, new_state):
        q = self.heads(self.conv("q", self.q_proj(x), state, new_state))
        k = self.heads(self.conv("k", self.k_proj(x), state, new_state), kv=True)
        v = self.heads(self.conv("v", self.v_proj(x), state, new_state), kv=True)
        q, k = self.rope(q, k, position_embeddings)
        q, k = l2_normalize(q) * scale_of(self.head_dim), l2_normalize(k)
        return Features(q=q, k=k, v=v, beta=self.gate_heads(self.b_proj(x)).sigmoid())

    def output(self, o, x):
        o = merge_heads(self.out_norm(o))
        if self.use_gate:
            o = o * F.silu(self.g_proj(x))
        return self.o_proj(o)
