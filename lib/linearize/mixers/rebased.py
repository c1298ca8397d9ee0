"""ReBased (Aksenov et al. 2024): linear attention with a learned quadratic kernel.

phi(x) = (gamma * LN(x) + beta)^(x2): the head vector is normalised (LayerNorm without affine),
given a learned affine (gamma, beta, shared by q and k), and mapped to its quadratic features,
so phi(q).phi(k) = (s q~ . k~)^2 with s = 1/sqrt(d). The features are the distinct products
x_a x_b of x x^T, off-diagonal ones times sqrt(2): d(d+1)/2 of them (2080 for d = 64), the same
kernel as the full outer product at half the width (``quadratic_features``, ordered by the
cyclic offset b - a so that forward and backward are a few whole-tensor passes). The kernel runs
on the full head dim (not FLA's 16-dim feature projection) so the teacher's q_proj/k_proj copy
in. Normalised: o_i = sum_j K_ij v_j / (sum_j K_ij + eps). Output: o_proj. The chunked form
(``quadratic_chunk``) keeps each KV head's features and state once for its query heads. A
forward that keeps no state (no cache: evaluation, training, ``core``) up to
``QUADRATIC_MAX_T`` tokens takes the T x T form instead (``quadratic_parallel``, as FLA's
parallel_rebased), which never builds the features and runs in strips of query rows.

Options (defaults): norm_eps 1e-6 (the normaliser's eps), rope False.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import kernels
from ..kernels.gated import _pad_time
from .common import repeat_kv, split_heads
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
        return quadratic_features(self.normed(x))

    def features(self, x, position_embeddings, state, new_state):
        # k and v stay at the KV heads here: the chunked form shares each KV head's features and
        # state among its query heads; ``_full`` repeats them for the other forms
        q = self.heads(self.q_proj(x))
        k = split_heads(self.k_proj(x), self.num_kv_heads)
        q, k = self.rope(q, k, position_embeddings)
        v_kv = split_heads(self.v_proj(x), self.num_kv_heads)
        # (s q~).k~ squared: the scale goes in before squaring, as FLA's parallel_rebased; it
        # goes into q~ itself, so phi(s q~) = s^2 phi(q~) costs no pass over the 2080 features
        return _QuadFeatures(q=None, k=None, v=repeat_kv(v_kv, self.num_heads),
                             q_low=self.normed(q) * scale_of(self.head_dim), k_low=self.normed(k), v_kv=v_kv)

    def _full(self, f):
        """The features themselves [B, H, T, d(d+1)/2] (recurrent and matrix forms, FLA)."""
        k_low = repeat_kv(f.k_low, self.num_heads)
        return replace(f, q=quadratic_features(f.q_low), k=quadratic_features(k_low), k_low=k_low)

    def _run(self, f, mode, state, keep_state=True):
        if mode != "chunk":
            return super()._run(self._full(f), mode, state)
        backend = self.config.backend
        if not keep_state and state is None and f.q_low.shape[-2] <= QUADRATIC_MAX_T:
            # no state in, none wanted: the T x T form, which never builds the 2080-wide features
            return quadratic_parallel(f.q_low, f.k_low, f.v_kv, self.eps), {}
        if state is None and not kernels.use_fla(backend, f.q_low.device, "gated linear attention",
                                                 key_dim=self.key_dim, dtype=f.q_low.dtype,
                                                 fla_dtypes=kernels.FLA_GATED_DTYPES):
            o, s = quadratic_chunk(f.q_low, f.k_low, f.v_kv, self.config.chunk_size, self.eps)
            return o, {"S": s}
        # with a state to continue from (or on FLA): the generic chunked kernel on the repeated
        # heads; our chunked form there still takes the intra-chunk weights (s q~.k~)^2 in the
        # head dim rather than as a dot product of 2080 features
        f = self._full(f)
        o, s = kernels.gated_attention(f.q, f.k, f.v, None, mode=mode, chunk_size=self.config.chunk_size,
                                       backend=backend, initial_state=None if state is None else state["S"],
                                       normalize=True, eps=self.eps, square_qk=(f.q_low, f.k_low))
        return o, {"S": s}

    def linear_matrix(self, x, position_embeddings=None):
        return self.kernel.matrix(self, self._full(self.features(x, position_embeddings, None, {})))


@dataclass
class _QuadFeatures(Features):
    q_low: torch.Tensor | None = None  # s * q~ [B, H, T, d]: phi_q . phi_k = (q_low . k_low)^2
    k_low: torch.Tensor | None = None  # k~ [B, H_kv, T, d] (repeated to [B, H, T, d] by ``_full``)
    v_kv: torch.Tensor | None = None  # v [B, H_kv, T, D] (``v`` is it repeated to the H heads)


# ------------------------------------------------------------------ the quadratic feature map
# Feature layout: row r = 0 .. d//2 of the cyclic offsets, entry a: x_a * x_{(a+r) mod d}, times
# sqrt(2) for r > 0; flattened row by row and cut at d(d+1)/2. Row 0 is the diagonal; rows
# 1 .. ceil(d/2)-1 hold every unordered pair {a, b} at offsets 1 .. d/2 once; for even d the
# last row r = d/2 would list each pair twice (a and a + d/2), so only its first d/2 entries are
# kept. Every pair appears exactly once, so phi(x).phi(y) = sum_a x_a^2 y_a^2 +
# 2 sum_{a<b} x_a x_b y_a y_b = (x.y)^2. Row r reads x at offset r of [x, x]: a strided window,
# no gather (gathers and 64 slices + cat, with their backward, were most of ReBased's time).
_SQRT2 = math.sqrt(2.0)
_ROWS_PER_BLOCK = 256  # backward works on this many rows of x at a time: temporaries of ~4 MB


def _windows(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d+1, d] view: row r, entry a = x_{(a+r) mod d}."""
    return torch.cat([x, x], -1).unfold(-1, x.shape[-1], 1)


class _QuadraticFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        d = x.shape[-1]
        full, rem = divmod(d * (d + 1) // 2, d)  # whole rows, and the half row (even d)
        out = x.new_empty(*x.shape[:-1], full * d + rem)
        w = _windows(x)
        torch.mul((x * _SQRT2).unsqueeze(-2), w[..., :full, :], out=out[..., :full * d].unflatten(-1, (full, d)))
        torch.mul(x, x, out=out[..., :d])
        if rem:
            torch.mul(x[..., :rem] * _SQRT2, x[..., rem:], out=out[..., full * d:])
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        # d phi_{r,a} = c_r (x_{a+r} dx_a + x_a dx_{a+r}): grad_a = sum_r c_r g_{r,a} x_{a+r}
        # (+) sum_r c_r g_{r,a-r} x_{a-r}. The second sum reads row r shifted by r: a strided
        # view of [h, h] per row with row stride 2d-1. Done in blocks of rows so the [rows,
        # d/2, 2d] temporaries stay small and are reused (fresh 100 MB tensors page-fault).
        x, = ctx.saved_tensors
        d = x.shape[-1]
        full, rem = divmod(d * (d + 1) // 2, d)
        x2, g2 = x.reshape(-1, d), g.reshape(-1, full * d + rem)
        # Both sums read a [rows, d/2, 2d] buffer h (each row r: two copies of a length-d
        # vector) through a sheared view: row stride 2d+1 gives entry (r, a) = copy[a + r],
        # 2d-1 from offset d gives copy[a - r]. (The overlapping ``_windows`` view made the
        # products ~10x slower here: its layout defeats vectorisation.)
        grad = torch.empty_like(x2)
        nb = min(_ROWS_PER_BLOCK, x2.shape[0])
        hh, pp = x2.new_empty(nb, full, 2 * d), x2.new_empty(nb, full, d)
        for r0 in range(0, x2.shape[0], nb):
            xb, gb = x2[r0:r0 + nb], g2[r0:r0 + nb]
            n = xb.shape[0]
            h, p = hh[:n], pp[:n]
            gr = gb[:, :full * d].unflatten(-1, (full, d))
            h.view(n, full, 2, d).copy_(xb[:, None, None, :])
            torch.mul(gr, h.as_strided((n, full, d), (h.stride(0), 2 * d + 1, 1), h.storage_offset()), out=p)
            t = p.sum(1)
            torch.mul(gr, xb.unsqueeze(1), out=h[..., :d])
            h[..., d:] = h[..., :d]
            t += h.as_strided((n, full, d), (h.stride(0), 2 * d - 1, 1), h.storage_offset() + d).sum(1)
            # all rows were taken with weight sqrt(2); row 0 (the diagonal, weight 1) gave
            # 2 sqrt(2) g_0a x_a instead of 2 g_0a x_a
            t.mul_(_SQRT2).sub_(gb[:, :d] * xb, alpha=2 * (_SQRT2 - 1))
            if rem:  # the half row: pairs (a, a + d/2), a < d/2, weight sqrt(2)
                gh = gb[:, full * d:] * _SQRT2
                t[:, :rem] += gh * xb[:, rem:]
                t[:, rem:] += gh * xb[:, :rem]
            grad[r0:r0 + n] = t
        return grad.view_as(x)


def quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d(d+1)/2] with phi(x).phi(y) = (x.y)^2 (layout: see above)."""
    return _QuadraticFeatures.apply(x)


# Longest sequence the stateless forward takes in the T x T form (``quadratic_parallel``):
# its cost grows as T^2 (d + V) / 2 against the chunked form's T d(d+1)/2 V. Measured with
# benchmarks/rebased_forms.py (9 query / 3 KV heads, d = V = 64, one thread, CPU seconds,
# load 2.8): the chunked form takes 8.7x / 4.4x / 2.3x / 1.0x the strip form's forward at
# batch 8 and T = 512 / 1024 / 2048 / 4096, and 8.9x / 2.8x / 1.4x its forward+backward at
# batch 1 and T = 512 / 2048 / 4096. The strips' temporaries at 4096 are ~75 MB at batch 8.
QUADRATIC_MAX_T = 4096
# Query rows per strip of the T x T form. Small strips waste little on the masked half of the
# diagonal block; the per-strip overhead grows as they shrink. fwd+bwd of the kernel, one
# thread, CPU seconds, load ~2 (measured while writing it, 2026-12-03), strips of 32 / 48 / 64 /
# 96 rows: 2048 x 1: 0.367 / 0.373 / 0.358-0.396 / 0.421 s (128: 0.408, 256: 0.518); 512 x 4:
# 0.122 / 0.115 / 0.126 / 0.137 s; 128 x 8: 0.025 / 0.026 / 0.031 / 0.032 s.
PARALLEL_BLOCK = 64


def _squared_causal_sums(a, b, v):
    """sum_{j <= i} (a_i.b_j)^2 v_j within one block: a [..., G, C, d] (the G query heads of a
    KV head, stacked), b [..., C, d], v [..., C, V] -> [..., G, C, V] (the chunked form's
    intra-chunk part, one block per chunk)."""
    c = b.shape[-2]
    w = (a @ b.unsqueeze(-3).transpose(-1, -2)).square()  # [..., G, C, C]
    w = w.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=a.device).tril(), 0.0)
    return w @ v.unsqueeze(-3)


def _strips(t: int, block: int):
    """(start, end, mask) per strip of query rows; mask is True above the diagonal of the
    strip's own [c, c] block (future keys)."""
    for s0 in range(0, t, block):
        e = min(s0 + block, t)
        yield s0, e, torch.ones(e - s0, e - s0, dtype=torch.bool).triu(1)


class _StripAttention(torch.autograd.Function):
    """o_i = sum_{j <= i} (a_i.b_j)^2 vv_j, one strip of query rows at a time against the keys
    up to the strip's end, so the masked upper triangle is never computed beyond the strip's own
    diagonal block. The G query heads of a KV head are stacked as rows of one matmul (no
    broadcast copies of b, no sum over G in backward). Backward recomputes each strip's
    (a_i.b_j) rather than keeping the T x T weights: the same five matmuls per strip as a
    flash-attention backward, and memory O(T C) instead of O(T^2) per head."""

    @staticmethod
    def forward(ctx, a5, b, vv, block):
        # a5 [B, Hk, G, T, d], b [B, Hk, T, d], vv [B, Hk, T, V+1] -> [B, Hk, G, T, V+1]
        bsz, hk, g, t, _ = a5.shape
        o = a5.new_empty(bsz, hk, g, t, vv.shape[-1])
        for s0, e, future in _strips(t, block):
            w = (a5[..., s0:e, :].flatten(2, 3) @ b[:, :, :e].transpose(-1, -2)).square_()
            w.view(bsz, hk, g, e - s0, e)[..., s0:].masked_fill_(future.to(w.device), 0.0)
            o[..., s0:e, :] = (w @ vv[:, :, :e]).view(bsz, hk, g, e - s0, -1)
        ctx.save_for_backward(a5, b, vv)
        ctx.block = block
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        # s = a b^T (masked), w = s^2: dvv = w^T go, ds = 2 s (go vv^T), da = ds b, db = ds^T a
        a5, b, vv = ctx.saved_tensors
        bsz, hk, g, t, d = a5.shape
        da, db, dvv = torch.empty_like(a5), torch.zeros_like(b), torch.zeros_like(vv)
        for s0, e, future in _strips(t, ctx.block):
            c = e - s0
            ar, gr = a5[..., s0:e, :].flatten(2, 3), go[..., s0:e, :].flatten(2, 3)
            s = ar @ b[:, :, :e].transpose(-1, -2)  # [B, Hk, G*c, e]
            s.view(bsz, hk, g, c, e)[..., s0:].masked_fill_(future.to(s.device), 0.0)
            dvv[:, :, :e] += s.square().transpose(-1, -2) @ gr
            ds = (gr @ vv[:, :, :e].transpose(-1, -2)).mul_(s).mul_(2.0)
            da[..., s0:e, :] = (ds @ b[:, :, :e]).view(bsz, hk, g, c, d)
            db[:, :, :e] += ds.transpose(-1, -2) @ ar
        return da, db, dvv, None


def quadratic_parallel(a, b, v, eps: float):
    """Normalised attention with weights (a_i.b_j)^2, j <= i, in T x T form (no state).

    Same arguments and output as ``quadratic_chunk`` without the final state: o [B, H, T, V] =
    sum_j w_ij v_j / (sum_j w_ij + eps); query head h reads KV head h // (H / H_kv). Computed
    in strips of ``PARALLEL_BLOCK`` query rows (``_StripAttention``), as FLA's
    parallel_rebased tiles it, never holding the T x T matrix."""
    bsz, h, t, d = a.shape
    hk = b.shape[1]
    vv = kernels.append_ones(v)  # the last column sums the weights: the normaliser
    o = _StripAttention.apply(a.view(bsz, hk, h // hk, t, d), b, vv, PARALLEL_BLOCK)
    return kernels.split_normaliser(o.reshape(bsz, h, t, vv.shape[-1]), eps)


def quadratic_chunk(a, b, v, chunk_size: int, eps: float):
    """Chunked normalised attention with weights (a_i.b_j)^2, j <= i, no initial state.

    a [B, H, T, d] (s q~), b [B, H_kv, T, d] (k~), v [B, H_kv, T, V]; query head h reads KV
    head h // (H / H_kv), as ``repeat_kv``. Returns (o [B, H, T, V] = sum_j w_ij v_j /
    (sum_j w_ij + eps), final state [B, H, d(d+1)/2, V+1] as the gated kernel's, whose last
    column is the normaliser). The same sums as ``gla_chunk`` with ``square_qk``, scheduled for
    the 2080-wide features: each KV head's features and state are computed once and read by
    its query heads in one matmul (the G query heads' chunks stacked as rows), and the first
    chunk reads no state."""
    bsz, h, t, d = a.shape
    hk = b.shape[1]
    g, c = h // hk, chunk_size
    n = -(-t // c)
    # padded keys are zero: no weight, no state; padded queries' rows are cut off below
    a, b, vv = (_pad_time(x, n * c) for x in (a, b, kernels.append_ones(v)))
    dv = vv.shape[-1]
    ac = a.view(bsz, hk, g, n, c, d).transpose(2, 3)  # [B, Hk, N, G, C, d]
    bc, vc = b.view(bsz, hk, n, c, d), vv.view(bsz, hk, n, c, dv)
    o_intra = _squared_causal_sums(ac, bc, vc).flatten(3, 4)  # [B, Hk, N, G*C, V+1]
    phi_q = quadratic_features(ac).flatten(3, 4)  # [B, Hk, N, G*C, F]
    phi_k = quadratic_features(bc)  # [B, Hk, N, C, F]
    # unbind once: indexing chunk i in the loop would make backward fill a full-size zero
    # gradient per chunk
    o_intra, phi_q, phi_k, vs = (x.unbind(2) for x in (o_intra, phi_q, phi_k, vc))
    outs, s = [o_intra[0]], None
    for i in range(n):
        if i:
            outs.append(o_intra[i] + phi_q[i] @ s)
        upd = phi_k[i].transpose(-1, -2) @ vs[i]
        s = upd if s is None else s + upd
    o = torch.stack(outs, 2).view(bsz, hk, n, g, c, dv).transpose(2, 3).reshape(bsz, h, n * c, dv)[:, :, :t]
    return kernels.split_normaliser(o, eps), repeat_kv(s, h).to(kernels.state_dtype(a.dtype))
