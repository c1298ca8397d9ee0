"""MetaLA (Chou et al. 2024): key-free linear attention with dynamic decay and self-augmentation.

The input first passes a causal short convolution with SiLU (conv_size 4, as the authors'
layer). Decay per channel alpha_t = sigmoid(W_a x + b)^(1/tau) (tau = 16, log space); the key is
not projected but tied to the decay, k_t = 1 - alpha_t. Query q_proj, value v_proj, scale
1/sqrt(d). Self-augmentation adds a token's own value with weight sigmoid(q_t . (w_aug * k_t))
(w_aug per channel, initialised 0), the form in the paper; it only adds to the diagonal of A.
(The authors' released code applies the sigmoid to (q.(w*k)) v elementwise instead, which is
not linear in v; we follow the paper so that A @ V stays exact.) Output: per-head LayerNorm
without affine, times silu(W_g x + b_g), then o_proj.

Options (defaults): forget_bias 3.0, gate_logit_normalizer 16, conv_size 4, rope False.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import HeadNorm, merge_heads
from .linear import Features, LinearMixer, scale_of
from .registry import register


@register
class MetaLA(LinearMixer):
    name = "metala"
    paper = "MetaLA (Chou et al. 2024)"
    option_names = ("forget_bias", "gate_logit_normalizer", *LinearMixer.CONV_OPTIONS)
    has_key = False
    decay = "dynamic-channel"
    matrix_note = ("A_ij = sum_d q_id (1 - alpha_jd) prod_{j<l<=i} alpha_ld / sqrt(d), plus the self-augmentation "
                   "weight sigmoid(q_i.(w_aug * k_i)) on the diagonal; o = A @ V exactly.")
    copy_skips = {"k_proj": "MetaLA has no key: k = 1 - alpha, alpha from its own decay projection gk_proj"}

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        c = config
        self.llama_projections(k=False)
        self.add_conv("x", c.hidden_size)
        self.gk_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=True)
        nn.init.constant_(self.gk_proj.bias, float(self.option("forget_bias", 3.0)))
        self.tau = float(self.option("gate_logit_normalizer", 16.0))
        self.g_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=True)
        self.aug_balance = nn.Parameter(torch.zeros(c.num_heads, c.head_dim))
        self.out_norm = HeadNorm(c.num_heads, c.head_dim, kind="layer", affine=False, eps=1e-5)

    def features(self, x, position_embeddings, state, new_state):
        x = self.conv("x", x, state, new_state)
        q = self.heads(self.q_proj(x))
        g = self.heads(F.logsigmoid(self.gk_proj(x)) / self.tau)
        k = -torch.expm1(g)
        q, k = self.rope(q, k, position_embeddings)
        aug = torch.sigmoid((q * k * self.aug_balance.unsqueeze(1).to(q.dtype)).sum(-1))
        return Features(q=q * scale_of(self.head_dim), k=k, v=self.heads(self.v_proj(x), kv=True), g=g,
                        diag=aug, out_input=x)  # the output gate reads the convolved input too

    def output(self, o, x):
        return self.o_proj(merge_heads(self.out_norm(o)) * F.silu(self.g_proj(x)))
