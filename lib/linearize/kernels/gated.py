"""Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t.

One kernel family for every mixer whose state decays multiplicatively:
* per-key-channel decay (GLA, HGRN2, MetaLA):   g [B, H, T, K]
* scalar decay per head (RetNet, Mamba2):        g [B, H, T, 1]  (broadcast over K)
* no decay (feature-map attention: ReBased, Hedgehog):  g = None

All tensors are [B, H, T, D]; g is the *log* decay (<= 0). No scale is applied here: callers
scale q themselves. The three forms:
* ``gla_chunk``      chunked parallel form, memory O(T * chunk): intra-chunk weights from
                     log-space segment sums (per-channel decay: one factorised matmul per
                     chunk where the decay span allows, else blocks, see ``_weights``), then a
                     sequential pass over the chunk states.
* ``gla_recurrent``  token by token (``gla_step``) on the state S [B, H, K, V].
* ``gla_matrix``     A[i, j] = sum_d q_id k_jd exp(sum_{j<l<=i} g_ld) for j <= i, else 0.
Decays are only ever formed as exponentials of log-space sums, never as a ratio of cumulative
products, so nothing overflows however long the sequence. Across blocks the segment sums are
plain sums of log decays. Inside a block (per-channel decay) the weight is a product of two
factors e^{b_i - r} e^{r - b_j} of in-block prefix sums b around the block's middle r, used only
where every |b - r| <= FACTOR_LIMIT (30): both factors stay in float32's normal range and the
rounding is ~block-length ulp of the block's total, as for a difference of prefix sums.

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


def _pad_time(x: torch.Tensor | None, length: int, value: float = 0.0, dim: int = 2):
    """Pad x along ``dim`` (time) up to ``length`` with ``value``."""
    if x is None or x.shape[dim] == length:
        return x
    dim = dim % x.dim()
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, length - x.shape[dim]]
    return F.pad(x, pad, value=value)


def _suffix(g: torch.Tensor) -> torch.Tensor:
    """Exclusive suffix sums along -2: out[j] = sum_{l > j} g_l (a plain sum, no differences).

    A product with the strictly upper triangular ones matrix: the same plain sum as a reversed
    cumsum, without the two flips (each a full copy; they were 9% of GLA's fwd+bwd)."""
    c = g.shape[-2]
    upper = torch.ones(c, c, dtype=g.dtype, device=g.device).triu(1)
    return upper @ g


def _check(q, k, v, g):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B,H,T,K] and v [B,H,T,V]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if g is not None and (g.shape[:3] != q.shape[:3] or g.shape[-1] not in (1, q.shape[-1])):
        raise ValueError(f"log decay g must be [B,H,T,K] or [B,H,T,1]; got {tuple(g.shape)} for q {tuple(q.shape)}")


def _exact_weights(q, k, g):
    """W[i, j] = sum_d q_id k_jd exp(sum_{j<l<=i} g_ld), j <= i, for one short block.

    q, k [..., T, K], g [..., T, K|1] or None. Memory T*T*K for per-channel decay, so it is
    only used on short blocks (see ``_weights``)."""
    t = q.shape[-2]
    if g is None:
        w = q @ k.transpose(-1, -2)
        return w.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), 0.0)
    if g.shape[-1] == 1:  # scalar decay: a [T, T] factor
        return (q @ k.transpose(-1, -2)) * segsum(g)[..., 0].exp()
    # per channel: [T, T, K] factors. Here (blocks of <= 16 steps inside the chunked form) the
    # segment sum is b_i - b_j of in-block prefix sums of log decays, masked to j <= i before
    # exp: 2x faster than the masked cumsum, the exponent is <= 0 up to rounding of |b_i|
    b = g.cumsum(-2)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril().unsqueeze(-1)
    seg = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal, float("-inf"))
    return ((q.unsqueeze(-2) * k.unsqueeze(-3)) * seg.exp()).sum(-1)


SUB_CHUNK = 16  # blocks of a chunk when the chunk as a whole cannot be factorised
EXACT_BLOCK = 4  # below this the [T, T, K] exact segment sums are cheap enough
# Largest |log factor| the factorised form may use: exp(+-30) keeps every factor and every
# unmasked product far inside float32's normal range (e^-87 .. e^88), so the factorised
# weights carry only the rounding of the exact ones.
FACTOR_LIMIT = 30.0


def _factorisable(g: torch.Tensor) -> bool:
    """Whether every block (last two dims [T, K] of ``g``) spans at most 2 * FACTOR_LIMIT of log
    decay per channel, so that ``_factored_weights`` stays within +-FACTOR_LIMIT."""
    b = g.detach().cumsum(-2)
    mid = b[..., (b.shape[-2] - 1) // 2: (b.shape[-2] - 1) // 2 + 1, :]
    return bool((b - mid).abs().amax() <= FACTOR_LIMIT) if b.numel() else True


def _factored_weights(q, k, g):
    """W[i, j] = sum_d (q_id e^{b_id - r_d}) (k_jd e^{r_d - b_jd}) masked to j <= i: one matmul.

    b: in-block prefix sums of the log decay, r: b at the block's middle row. Exact up to
    rounding wherever |b - r| <= FACTOR_LIMIT (``_factorisable``): each product of factors is
    e^{b_i - b_j} times rounding. Entries j > i can be huge (even inf) and are masked out by
    ``masked_fill``, whose backward passes no gradient through them."""
    t = q.shape[-2]
    b = g.cumsum(-2)
    r = b[..., (t - 1) // 2: (t - 1) // 2 + 1, :]
    w = (q * (b - r).exp()) @ (k * (r - b).exp()).transpose(-1, -2)
    return w.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), 0.0)


def _weights(q, k, g, block: int):
    """Causal decayed weights W [..., T, T] (as ``_exact_weights``) for any leading dims.

    Scalar or no decay: ``_exact_weights`` (a [T, T] factor). Per-channel decay, cheapest
    exact form first:
    1. the whole block factorised into one matmul (``_factored_weights``), when its decay span
       allows (``_factorisable``, checked over all leading dims at once: one strongly decaying
       channel anywhere sends the whole call to step 2);
    2. otherwise split into blocks of ``block`` (a block no longer than ``block`` is split in
       about four): an off-diagonal block (row block n, row i; column block m < n, column j)
       splits the segment (j, i] at the block borders into [j's block after j] + [whole blocks
       m+1..n-1] + [n's block up to i]; each part is a sum of log decays, so every factor is
       <= 1 and nothing overflows however strong the decay. Diagonal blocks recurse (step 1,
       else smaller blocks), down to exact segment sums on blocks of EXACT_BLOCK steps.
    Memory O(T^2 + T * block * K)."""
    t = q.shape[-2]
    if g is None or g.shape[-1] == 1 or t <= 1:
        return _exact_weights(q, k, g)
    if _factorisable(g):
        return _factored_weights(q, k, g)
    if t <= EXACT_BLOCK:
        return _exact_weights(q, k, g)
    if t <= block:
        block = max(EXACT_BLOCK, -(-t // 4))
    *lead, _, dk = q.shape
    n = -(-t // block)
    q, k, g = (_pad_time(x, n * block, dim=-2) for x in (q, k, g))
    qc, kc, gc = (x.reshape(*lead, n, block, dk) for x in (q, k, g))
    totals = gc.sum(-2)  # [..., n, K]
    between = segsum(totals)  # [..., n, n, K]: sum over blocks (m, n]
    # blocks strictly between m and n: row n reads row n-1; m >= n -> -inf (weight 0)
    between = torch.cat([torch.full_like(between[..., :1, :, :], float("-inf")), between[..., :-1, :, :]], dim=-3)
    p = qc.unsqueeze(-3) * (gc.cumsum(-2).unsqueeze(-3) + between.unsqueeze(-2)).exp()  # [..., n, m, c, K]
    kk = kc * _suffix(gc).exp()  # [..., m, c, K]
    blocks = torch.einsum("...nmid,...mjd->...nimj", p, kk)  # [..., n, c, n, c], zero for m >= n
    diag = _weights(qc, kc, gc, block)  # recursion: factorised, or split further
    eye = torch.eye(n, dtype=q.dtype, device=q.device).view(n, 1, n, 1)
    blocks = blocks + diag.unsqueeze(-2) * eye
    return blocks.reshape(*lead, n * block, n * block)[..., :t, :t]


def gla_chunk(q, k, v, g=None, initial_state=None, chunk_size: int = 64, square_qk=None):
    """Chunked parallel form. Returns (o [B,H,T,V], final state S [B,H,K,V]).

    ``square_qk=(a, b)``, tensors [B,H,T,d] with q_i.k_j = (a_i.b_j)^2 (the kernel trick of a
    quadratic feature map q = phi(a), k = phi(b)), no decay: the intra-chunk weights are then
    computed in a's width d (64) instead of q's (ReBased: 2080). The caller vouches for the
    identity; only the inter-chunk state uses q and k."""
    _check(q, k, v, g)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    n = -(-t // c)
    # padded tail: k = v = 0 and g = 0 (no decay), so it changes neither outputs nor the state
    q, k, v, g = (_pad_time(x, n * c) for x in (q, k, v, g))
    qc, kc, vc = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))
    gc = None if g is None else g.reshape(b, h, n, c, g.shape[-1])
    if square_qk is not None:
        if g is not None:
            raise ValueError("square_qk (a quadratic feature map's kernel trick) needs g=None: no decay")
        ac, bc = (_pad_time(x, n * c).reshape(b, h, n, c, x.shape[-1]) for x in square_qk)
        w = (ac @ bc.transpose(-1, -2)).square()
        w = w.masked_fill(~torch.ones(c, c, dtype=torch.bool, device=q.device).tril(), 0.0)
    else:
        w = _weights(qc, kc, gc, SUB_CHUNK)
    o_intra = w @ vc  # [B,H,N,C,V], all chunks at once
    s0 = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    if gc is None:
        q_in, k_out, chunk_decay = qc, kc, None
    else:
        q_in = qc * gc.cumsum(-2).exp()  # decay from the chunk start to i (inclusive)
        k_out = kc * _suffix(gc).exp()  # decay from j (exclusive) to the chunk end
        chunk_decay = gc.sum(-2).exp()  # [B,H,N,Kg]
    s = s0
    # unbind once: indexing chunk i inside the loop would make backward fill a full-size zero
    # gradient per chunk (quadratic in the number of chunks)
    o_intra, q_in, k_out, vs = (x.unbind(2) for x in (o_intra, q_in, k_out, vc))
    decays = None if chunk_decay is None else chunk_decay.unsqueeze(-1).unbind(2)
    outs = []
    for i in range(n):
        outs.append(o_intra[i] + q_in[i] @ s)
        upd = k_out[i].transpose(-1, -2) @ vs[i]
        s = upd + (s if decays is None else decays[i] * s)
    o = torch.stack(outs, dim=2).reshape(b, h, n * c, dv)[:, :, :t]
    return o, s


def gla_step(q_t, k_t, v_t, g_t, state):
    """One token: q_t, k_t [B,H,K], v_t [B,H,V], g_t [B,H,K|1] or None, state [B,H,K,V]."""
    if g_t is not None:
        state = g_t.exp().unsqueeze(-1) * state
    state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q_t, state), state


def gla_step_fused(q_t, k_t, v_t, g_t, state):
    """``gla_step`` in fewer, larger ops (the decode path; tests compare it with ``gla_step``).

    A decode step of a small model is dominated by per-op cost (dispatch, and on 2 threads an
    OpenMP fork/join for every state-sized op), not by arithmetic: the decay is one multiply,
    the rank-1 write one batched baddbmm into that fresh product, the read one bmm."""
    b, h, dk, dv = state.shape
    if g_t is None:
        s = state.reshape(b * h, dk, dv)
        s = torch.baddbmm(s, k_t.reshape(b * h, dk, 1), v_t.reshape(b * h, 1, dv))
    else:
        s = (state * g_t.exp().unsqueeze(-1)).reshape(b * h, dk, dv)  # a new tensor: written in place below
        s.baddbmm_(k_t.reshape(b * h, dk, 1), v_t.reshape(b * h, 1, dv))
    o = torch.bmm(q_t.reshape(b * h, 1, dk), s)
    return o.view(b, h, dv), s.view(b, h, dk, dv)


def gla_recurrent(q, k, v, g=None, initial_state=None):
    """Token-by-token form (``gla_step_fused``). Returns (o [B,H,T,V], final state [B,H,K,V])."""
    _check(q, k, v, g)
    b, h, t, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for i in range(t):
        o_t, s = gla_step_fused(q[:, :, i], k[:, :, i], v[:, :, i], None if g is None else g[:, :, i], s)
        outs.append(o_t)
    return (outs[0].unsqueeze(2) if t == 1 else torch.stack(outs, dim=2)), s


def gla_matrix(q, k, g=None, chunk_size: int = 64):
    """Materialised A [B,H,T,T] with A[i,j] = sum_d q_id k_jd exp(sum_{j<l<=i} g_ld), j <= i.

    Memory O(T^2 + T * chunk * K) (block factorisation, see ``_weights``)."""
    _check(q, k, k, g)
    return _weights(q, k, g, chunk_size)


def append_ones(v: torch.Tensor) -> torch.Tensor:
    """[.., V] -> [.., V+1]: the extra column carries the linear-attention denominator."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def split_normaliser(o: torch.Tensor, eps: float) -> torch.Tensor:
    """Output of the kernel run on [v, 1] -> normalised output o / (denominator + eps)."""
    return o[..., :-1] / (o[..., -1:] + eps)
