"""mLSTM (xLSTM's matrix-memory cell) with its max-state stabiliser.

Recurrence (Beck et al. 2024), with log forget gate lf_t = logsigmoid(f~_t) and exponential
input gate i_t = exp(ig_t):
    m_t = max(lf_t + m_{t-1}, ig_t)
    C_t = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(ig_t - m_t) k_t v_t^T
    n_t = exp(lf_t + m_{t-1} - m_t) n_{t-1} + exp(ig_t - m_t) k_t
    h_t = C_t^T q_t / max(|n_t . q_t|, exp(-m_t))
C and n are stored scaled by exp(-m_t); m only keeps the exponentials in range. Multiplying
numerator and denominator by exp(m_t) shows h_t does not depend on m at all:
    h_t = sum_j D_tj (q_t.k_j) v_j / max(|sum_j D_tj (q_t.k_j)|, 1),
    D_tj = exp(sum_{j<l<=t} lf_l + ig_j).
So the mixing matrix is A_tj = D_tj (q_t.k_j) / max(|sum_l D_tl (q_t.k_l)|, 1): the normaliser
depends only on q, k and the gates, never on V, and h = A @ V holds exactly.

Tensors [B, H, T, D], gates [B, H, T]; callers scale k (1/sqrt(d)) themselves. The state is
(C [B,H,K,V], n [B,H,K], m [B,H]); the initial state is zeros with m = 0 (as xLSTM's kernels).
The chunked form carries n as an extra value column of C.
"""
from __future__ import annotations

import torch

from .gated import _pad_time, append_ones, segsum


def _zero_state(q, dv):
    b, h, _, dk = q.shape
    return (q.new_zeros(b, h, dk, dv), q.new_zeros(b, h, dk), q.new_zeros(b, h))


def _normalise(num, den, m):
    """num [.., V], den [..], m [..] -> num / max(|den|, exp(-m))."""
    return num / torch.maximum(den.abs(), (-m).exp()).unsqueeze(-1)


def mlstm_step(q_t, k_t, v_t, lf_t, ig_t, state):
    """q_t, k_t [B,H,K], v_t [B,H,V], lf_t, ig_t [B,H]; state (C, n, m)."""
    c, n, m = state
    m_new = torch.maximum(lf_t + m, ig_t)
    f = (lf_t + m - m_new).exp()
    i = (ig_t - m_new).exp()
    c = f[..., None, None] * c + i[..., None, None] * k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    n = f[..., None] * n + i[..., None] * k_t
    num = torch.einsum("bhk,bhkv->bhv", q_t, c)
    den = (q_t * n).sum(-1)
    return _normalise(num, den, m_new), (c, n, m_new)


def mlstm_step_fused(q_t, k_t, v_t, lf_t, ig_t, state):
    """``mlstm_step`` in fewer, larger ops (the decode path; tests compare it with ``mlstm_step``):
    the forget scaling is one multiply, the gated rank-1 write one baddbmm into that fresh
    product, the read one bmm."""
    c, n, m = state
    b, h, dk, dv = c.shape
    m_new = torch.maximum(lf_t + m, ig_t)
    f = (lf_t + m - m_new).exp()
    ik = k_t * (ig_t - m_new).exp().unsqueeze(-1)
    c = (c * f[..., None, None]).reshape(b * h, dk, dv)  # a new tensor: written in place below
    c.baddbmm_(ik.reshape(b * h, dk, 1), v_t.reshape(b * h, 1, dv))
    n = torch.addcmul(ik, n, f.unsqueeze(-1))
    num = torch.bmm(q_t.reshape(b * h, 1, dk), c).view(b, h, dv)
    return _normalise(num, torch.linalg.vecdot(q_t, n), m_new), (c.view(b, h, dk, dv), n, m_new)


def mlstm_recurrent(q, k, v, lf, ig, initial_state=None):
    """Token-by-token form (``mlstm_step_fused``). Returns (o [B,H,T,V], (C, n, m))."""
    state = _zero_state(q, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    t_len = q.shape[2]
    for t in range(t_len):
        h, state = mlstm_step_fused(q[:, :, t], k[:, :, t], v[:, :, t], lf[:, :, t], ig[:, :, t], state)
        outs.append(h)
    return (outs[0].unsqueeze(2) if t_len == 1 else torch.stack(outs, dim=2)), state


def mlstm_chunk(q, k, v, lf, ig, initial_state=None, chunk_size: int = 64):
    """Chunked form: exact within-chunk weights, one stabilised state hand-over per chunk."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    cs = chunk_size
    nc = -(-t // cs)
    # padded tail: no forgetting (lf = 0) and input gate exp(-inf) = 0: it adds nothing
    q, k, v = (_pad_time(x, nc * cs) for x in (q, k, v))
    lf = _pad_time(lf.unsqueeze(-1), nc * cs).squeeze(-1)
    ig = _pad_time(ig.unsqueeze(-1), nc * cs, value=float("-inf")).squeeze(-1)
    qc, kc = (x.reshape(b, h, nc, cs, dk) for x in (q, k))
    vc = append_ones(v).reshape(b, h, nc, cs, dv + 1)  # last column accumulates n
    lfc, igc = lf.reshape(b, h, nc, cs, 1), ig.reshape(b, h, nc, cs)
    seg = segsum(lfc)[..., 0]  # [B,H,N,C,C]: sum of lf over (j, i]
    log_d = seg + igc.unsqueeze(-2)  # log D within the chunk, -inf above the diagonal
    b_in = lfc[..., 0].cumsum(-1)  # [B,H,N,C]: lf summed from the chunk start to i
    log_w_end = seg[..., -1, :] + igc  # [B,H,N,C]: weight of token j at the chunk end
    total = lfc[..., 0].sum(-1)  # [B,H,N]
    qk = qc @ kc.transpose(-1, -2)
    c0, n0, m = _zero_state(q, dv) if initial_state is None else initial_state
    s = torch.cat([c0, n0.unsqueeze(-1)], dim=-1).to(q.dtype)  # [B,H,K,V+1]
    outs = []
    # unbind once: per-chunk indexing in the loop would make backward quadratic (see gla_chunk)
    b_in, log_d, qk, vc, qc, kc, total, log_w_end = (
        x.unbind(2) for x in (b_in, log_d, qk, vc, qc, kc, total, log_w_end))
    for i in range(nc):
        log_inter = b_in[i] + m.unsqueeze(-1)  # [B,H,C]: weight of the carried state
        m_row = torch.maximum(log_inter, log_d[i].amax(-1))
        w = qk[i] * (log_d[i] - m_row.unsqueeze(-1)).exp()
        out = w @ vc[i] + (log_inter - m_row).exp().unsqueeze(-1) * (qc[i] @ s)
        outs.append(_normalise(out[..., :dv], out[..., dv], m_row))
        m_new = torch.maximum(total[i] + m, log_w_end[i].amax(-1))
        kw = kc[i] * (log_w_end[i] - m_new.unsqueeze(-1)).exp().unsqueeze(-1)
        s = (total[i] + m - m_new).exp()[..., None, None] * s + kw.transpose(-1, -2) @ vc[i]
        m = m_new
    o = torch.stack(outs, dim=2).reshape(b, h, nc * cs, dv)[:, :, :t]
    return o, (s[..., :dv], s[..., dv], m)


def mlstm_matrix(q, k, lf, ig):
    """A [B,H,T,T] (see the module docstring), stabilised by the row maximum of log D."""
    log_d = segsum(lf.unsqueeze(-1))[..., 0] + ig.unsqueeze(-2)
    m = log_d.amax(-1)
    w = (q @ k.transpose(-1, -2)) * (log_d - m.unsqueeze(-1)).exp()
    return w / torch.maximum(w.sum(-1).abs(), (-m).exp()).unsqueeze(-1)
