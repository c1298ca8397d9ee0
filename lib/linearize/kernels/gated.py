"""Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t.

One kernel family for every mixer whose state decays multiplicatively:
* per-key-channel decay (GLA, HGRN2, MetaLA):   g [B, H, T, K]
* scalar decay per head (RetNet, Mamba2):        g [B, H, T, 1]  (broadcast over K)
* no decay (feature-map attention: ReBased, Hedgehog):  g = None

All tensors are [B, H, T, D]; g is the *log* decay (<= 0). No scale is applied here: callers
scale q themselves. The three forms:
* ``gla_chunk``      chunked parallel form, memory O(T * chunk * K): exact intra-chunk
                     weights from log-space segment sums, a sequential pass over chunk states.
* ``gla_recurrent``  token by token (``gla_step``) on the state S [B, H, K, V].
* ``gla_matrix``     A[i, j] = sum_d q_id k_jd exp(sum_{j<l<=i} g_ld) for j <= i, else 0.
Decays are only ever formed as exp(sum of log decays over a segment): never as a ratio of
cumulative products, so nothing overflows however long the sequence.

``normalize=True`` (in ``gated_attention``) adds the linear-attention normaliser
o_i = sum_j A_ij v_j / (sum_j A_ij + eps) by running the same kernel on [v, 1]: the last
column of the output is the denominator. The mixing matrix is then the row-normalised
A_ij / (sum_l A_il + eps), and o = A_norm @ V still holds exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(g: torch.Tensor) -> torch.Tensor:
    """g [..., C, K] -> [..., C, C, K]: out[i, j] = sum_{j<l<=i} g_l for j <= i, -inf for j > i.

    Computed as a cumulative sum of masked copies (no differences of prefix sums), so each
    entry is a plain sum of non-positive log decays."""
    c = g.shape[-2]
    strictly_lower = torch.ones(c, c, dtype=torch.bool, device=g.device).tril(-1)  # [l, j]: l > j
    y = g.unsqueeze(-2).expand(*g.shape[:-1], c, g.shape[-1])  # y[l, j] = g_l
    y = y.masked_fill(~strictly_lower.unsqueeze(-1), 0.0)
    out = y.cumsum(dim=-3)  # out[i, j] = sum_{l <= i, l > j} g_l
    causal = torch.ones(c, c, dtype=torch.bool, device=g.device).tril()
    return out.masked_fill(~causal.unsqueeze(-1), float("-inf"))


def _pad_time(x: torch.Tensor | None, length: int, value: float = 0.0):
    if x is None or x.shape[2] == length:
        return x
    pad = [0, 0] * (x.dim() - 3) + [0, length - x.shape[2]]
    return F.pad(x, pad, value=value)


def _check(q, k, v, g):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B,H,T,K] and v [B,H,T,V]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if g is not None and (g.shape[:3] != q.shape[:3] or g.shape[-1] not in (1, q.shape[-1])):
        raise ValueError(f"log decay g must be [B,H,T,K] or [B,H,T,1]; got {tuple(g.shape)} for q {tuple(q.shape)}")


def _intra_weights(q, k, seg):
    """Within-chunk weights W[i, j] = sum_d q_id k_jd exp(seg[i, j, d]); q, k [..., C, K]."""
    if seg is None:
        w = q @ k.transpose(-1, -2)
        c = q.shape[-2]
        return w.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=q.device).tril(), 0.0)
    if seg.shape[-1] == 1:  # scalar decay: a [C, C] factor
        return (q @ k.transpose(-1, -2)) * seg[..., 0].exp()
    # per-channel decay: the [C, C, K] factor is what makes memory O(T * chunk * K)
    return torch.einsum("...id,...jd,...ijd->...ij", q, k, seg.exp())


def gla_chunk(q, k, v, g=None, initial_state=None, chunk_size: int = 64):
    """Chunked parallel form. Returns (o [B,H,T,V], final state S [B,H,K,V])."""
    _check(q, k, v, g)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    n = -(-t // c)
    # padded tail: k = v = 0 and g = 0 (no decay), so it changes neither outputs nor the state
    q, k, v, g = (_pad_time(x, n * c) for x in (q, k, v, g))
    qc, kc, vc = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))
    if g is None:
        seg = None
        q_in, k_out, chunk_decay = qc, kc, None
    else:
        gc = g.reshape(b, h, n, c, g.shape[-1])
        seg = segsum(gc)  # [B,H,N,C,C,Kg]
        q_in = qc * gc.cumsum(-2).exp()  # decay from the chunk start to i (inclusive)
        k_out = kc * seg[..., -1, :, :].exp()  # decay from j (exclusive) to the chunk end
        chunk_decay = gc.sum(-2).exp()  # [B,H,N,Kg]
    o_intra = _intra_weights(qc, kc, seg) @ vc  # [B,H,N,C,V], all chunks at once
    s = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for i in range(n):
        outs.append(o_intra[:, :, i] + q_in[:, :, i] @ s)
        upd = k_out[:, :, i].transpose(-1, -2) @ vc[:, :, i]
        s = upd + (s if chunk_decay is None else chunk_decay[:, :, i].unsqueeze(-1) * s)
    o = torch.stack(outs, dim=2).reshape(b, h, n * c, dv)[:, :, :t]
    return o, s


def gla_step(q_t, k_t, v_t, g_t, state):
    """One token: q_t, k_t [B,H,K], v_t [B,H,V], g_t [B,H,K|1] or None, state [B,H,K,V]."""
    if g_t is not None:
        state = g_t.exp().unsqueeze(-1) * state
    state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q_t, state), state


def gla_recurrent(q, k, v, g=None, initial_state=None):
    """Token-by-token form. Returns (o [B,H,T,V], final state [B,H,K,V])."""
    _check(q, k, v, g)
    b, h, t, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for i in range(t):
        o_t, s = gla_step(q[:, :, i], k[:, :, i], v[:, :, i], None if g is None else g[:, :, i], s)
        outs.append(o_t)
    return torch.stack(outs, dim=2), s


def gla_matrix(q, k, g=None, chunk_size: int = 64):
    """Materialised A [B,H,T,T] with A[i,j] = sum_d q_id k_jd exp(sum_{j<l<=i} g_ld), j <= i.

    Built block by block so memory stays O(T^2 + T * chunk * K): a diagonal block uses the
    exact in-chunk segment sums; an off-diagonal block (chunk n row i, chunk m < n column j)
    factorises the segment (j, i] into [j's chunk after j] + [whole chunks m+1..n-1] +
    [n's chunk up to i], each a sum of log decays, each exponent <= 0."""
    _check(q, k, k, g)
    b, h, t, dk = q.shape
    if g is None:
        return _intra_weights(q, k, None)
    c = chunk_size
    n = -(-t // c)
    q, k, g = (_pad_time(x, n * c) for x in (q, k, g))
    qc, kc, gc = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, g))
    seg = segsum(gc)  # [B,H,N,C,C,Kg]
    q_in = gc.cumsum(-2)  # log decay chunk start .. i
    k_out = seg[..., -1, :, :]  # log decay j (excl) .. chunk end
    totals = gc.sum(-2)  # [B,H,N,Kg]
    between = segsum(totals)  # [B,H,N,N,Kg]: sum of totals over chunks (m, n]
    # chunks strictly between m and n: shift rows by one (row n reads row n-1); m >= n -> -inf
    between = torch.cat([torch.full_like(between[:, :, :1], float("-inf")), between[:, :, :-1]], dim=2)
    # P[n, m, i, d] = q[n,i,d] exp(q_in[n,i,d] + between[n,m,d]); zero for m >= n
    p = qc.unsqueeze(3) * (q_in.unsqueeze(3) + between.unsqueeze(4)).exp()  # [B,H,N,N,C,K]
    kk = kc * k_out.exp()  # [B,H,N,C,K]
    blocks = torch.einsum("bhnmid,bhmjd->bhnimj", p, kk)  # [B,H,N,C,N,C]
    diag = _intra_weights(qc, kc, seg)  # [B,H,N,C,C]
    idx = torch.arange(n, device=q.device)
    blocks = blocks.clone()
    blocks[:, :, idx, :, idx, :] = diag.permute(2, 0, 1, 3, 4)
    a = blocks.reshape(b, h, n * c, n * c)
    return a[:, :, :t, :t]


def append_ones(v: torch.Tensor) -> torch.Tensor:
    """[.., V] -> [.., V+1]: the extra column carries the linear-attention denominator."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def split_normaliser(o: torch.Tensor, eps: float) -> torch.Tensor:
    """Output of the kernel run on [v, 1] -> normalised output o / (denominator + eps)."""
    return o[..., :-1] / (o[..., -1:] + eps)
