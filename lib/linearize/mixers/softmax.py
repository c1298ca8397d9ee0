"""Softmax attention, Llama style: the Llama-Llama baseline of the study.

Same projections and RoPE as the teacher's LlamaAttention (GQA: H query heads, H_kv KV heads).
* chunk:      causal scaled-dot-product attention (torch sdpa) over the whole block.
* recurrent:  a growing KV cache (state {"k", "v"} of H_kv heads, grows by T per call); new
              tokens attend to the cache plus themselves causally. Not constant-size: that is
              the teacher's cost the students remove.
* matrix:     A = softmax(Q K^T / sqrt(d) + causal mask).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import CoreOut, MixerConfig, TokenMixer
from .common import apply_rope, merge_heads, repeat_kv, split_heads
from .registry import register


@register
class SoftmaxAttention(TokenMixer):
    name = "softmax"
    paper = "Llama softmax attention (Touvron et al. 2023)"
    family = "softmax"  # no kernel family of linear.py: its own quadratic form
    option_names = ("rope",)
    has_query = True
    has_key = True
    decay = "none"
    matrix_note = "A = softmax(QK^T/sqrt(d) + causal mask); o = A @ V exactly."

    def __init__(self, config: MixerConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.use_rope = bool(c.options.get("rope", True))
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.backend == "fla":
            raise ValueError("softmax attention has no FLA kernel; use backend='auto' or 'torch'")

    def _qkv(self, x, position_embeddings):
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        if self.use_rope:
            q, k = apply_rope(q, position_embeddings), apply_rope(k, position_embeddings)
        return q, k, v  # k, v keep H_kv heads (that is what the cache stores)

    def init_state(self, batch_size, device, dtype):
        empty = torch.zeros(batch_size, self.num_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def _attend(self, q, k, v, mode):
        """q [B,H,T,D] over k, v [B,H_kv,S,D] (S >= T; the last T keys are q's own tokens)."""
        k, v = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)
        t, s = q.shape[2], k.shape[2]
        if mode == "chunk" and t == s:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # query i (absolute position s - t + i) sees keys j <= s - t + i
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v

    def forward(self, x, position_embeddings=None, state=None, mode=None, keep_state=True):
        mode = mode or ("recurrent" if state is not None else "chunk")
        q, k, v = self._qkv(x, position_embeddings)
        if state is not None:
            k = torch.cat([state["k"].to(k.dtype), k], dim=2)
            v = torch.cat([state["v"].to(v.dtype), v], dim=2)
        o = self._attend(q, k, v, mode if state is None else "recurrent")
        return self.o_proj(merge_heads(o)), ({"k": k, "v": v} if keep_state else None)

    def core(self, x, position_embeddings=None, mode="chunk"):
        q, k, v = self._qkv(x, position_embeddings)
        if mode == "chunk":
            o = self._attend(q, k, v, "chunk")
        else:  # token by token against the growing cache
            outs = []
            for t in range(x.shape[1]):
                outs.append(self._attend(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], "recurrent"))
            o = torch.cat(outs, dim=2)
        return CoreOut(o=o, v=repeat_kv(v, self.num_heads))

    def mixing_matrix(self, x, position_embeddings=None):
        q, k, _ = self._qkv(x, position_embeddings)
        k = repeat_kv(k, self.num_heads)
        t = q.shape[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)
