"""mLSTM, the matrix-memory cell of xLSTM (Beck et al. 2024), as a token mixer.

Per head: q, k, v from the input (Llama-shaped projections, so the teacher's copy in), k scaled
by 1/sqrt(d); scalar forget gate f = sigmoid(W_f x + b_f) used in log space, exponential input
gate i = exp(W_i x + b_i); max-state stabiliser and normaliser max(|n.q|, exp(-m)) (kernels.mlstm).
As in the mLSTM block, q and k pass a causal short convolution with SiLU (options conv_size=4,
0 disables) and v does not; the output is a per-head LayerNorm times the output gate
sigmoid(W_o x), then o_proj. The block's up-projection and learnable skip are left out: the
student keeps the teacher's MLP around the mixer.

Options (defaults): forget_bias 3.0 (sigmoid ~ 0.95), input_bias -forget_bias (coupled, i = 1-f
at init in the sigmoid sense; exp(-3) ~ 0.05 here), conv_size 4, rope False.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .common import HeadNorm, merge_heads
from .linear import Features, LinearMixer, scale_of
from .registry import register


@register
class MLSTM(LinearMixer):
    name = "xlstm"
    paper = "mLSTM cell of xLSTM (Beck et al. 2024)"
    family = "mlstm"
    option_names = ("forget_bias", "input_bias", *LinearMixer.CONV_OPTIONS)
    decay = "dynamic-scalar"
    matrix_note = ("A_tj = D_tj (q_t.k_j) / max(|sum_l D_tl (q_t.k_l)|, 1), D_tj = exp(sum_{j<l<=t} log f_l + i~_j): "
                   "the normaliser depends on q, k and the gates only, so the cell output is exactly A @ V; "
                   "the max-state m cancels out.")

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        c = config
        self.llama_projections()
        self.add_conv("q", c.num_heads * c.head_dim)
        self.add_conv("k", c.num_kv_heads * c.head_dim)
        self.igate = nn.Linear(c.hidden_size, c.num_heads, bias=True)
        self.fgate = nn.Linear(c.hidden_size, c.num_heads, bias=True)
        self.ogate = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.out_norm = HeadNorm(c.num_heads, c.head_dim, kind="layer", eps=self.eps)
        fb = float(self.option("forget_bias", 3.0))
        nn.init.constant_(self.fgate.bias, fb)
        nn.init.constant_(self.igate.bias, float(self.option("input_bias", -fb)))

    def features(self, x, position_embeddings, state, new_state):
        q = self.heads(self.conv("q", self.q_proj(x), state, new_state))
        k = self.heads(self.conv("k", self.k_proj(x), state, new_state), kv=True)
        v = self.heads(self.v_proj(x), kv=True)
        q, k = self.rope(q, k, position_embeddings)
        return Features(q=q, k=k * scale_of(self.head_dim), v=v,
                        lf=F.logsigmoid(self.gate_heads(self.fgate(x))),
                        ig=self.gate_heads(self.igate(x)))

    def output(self, o, x):
        return self.o_proj(merge_heads(self.out_norm(o)) * self.ogate(x).sigmoid())
