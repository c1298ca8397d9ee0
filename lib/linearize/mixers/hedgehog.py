"""Hedgehog (Zhang et al. 2024): linear attention with a learned softmax feature map.

phi(x) = [softmax(x W + b), softmax(-(x W + b))] over the feature dim, a trainable map per head
(W [d, d] initialised to the identity, b = 0) with separate maps for queries and keys, giving
2d features that are positive, so the normalised linear attention is well defined:
o_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps). Output: o_proj.

Options (defaults): norm_eps 1e-6, rope False.
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import Features, LinearMixer
from .registry import register


class HedgehogFeatureMap(nn.Module):
    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # [H, d, d]
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, head_dim))

    def forward(self, x):  # [B, H, T, d] -> [B, H, T, 2d]
        z = torch.einsum("bhtd,hde->bhte", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


@register
class Hedgehog(LinearMixer):
    name = "hedgehog"
    paper = "Hedgehog (Zhang et al. 2024)"
    normalize = True
    decay = "none"
    matrix_note = ("A_ij = phi_q(q_i).phi_k(k_j) / (sum_{l<=i} phi_q(q_i).phi_k(k_l) + eps) for j <= i: the "
                   "row-normalised feature-map kernel; o = A @ V exactly (the normaliser depends on q, k only).")

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.llama_projections()
        self.fmap_q = HedgehogFeatureMap(config.num_heads, config.head_dim)
        self.fmap_k = HedgehogFeatureMap(config.num_heads, config.head_dim)
        self.key_dim = 2 * config.head_dim

    def features(self, x, position_embeddings, state, new_state):
        q, k = self.heads(self.q_proj(x)), self.heads(self.k_proj(x), kv=True)
        q, k = self.rope(q, k, position_embeddings)
        return Features(q=self.fmap_q(q), k=self.fmap_k(k), v=self.heads(self.v_proj(x), kv=True))
