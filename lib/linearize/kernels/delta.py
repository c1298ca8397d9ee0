"""Delta rule (DeltaNet): S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,  o_t = S_t^T q_t.

Tensors [B, H, T, D], beta [B, H, T]; callers L2-normalise and scale q, k themselves.
* ``delta_chunk``      chunked form with the WY/UT transform: inside a chunk the corrected
                       values are U - W S0 with T = (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta),
                       U = T V, W = T K, found by one unit-lower-triangular solve per chunk.
* ``delta_recurrent``  token by token (``delta_step``) on S [B, H, K, V].
* ``delta_matrix``     A = tril(Q K^T) (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta), so
                       o = A @ V (the output is linear in V for fixed q, k, beta).
"""
from __future__ import annotations

import torch

from .gated import _pad_time


def _ut_transform(k, beta):
    """T = (I + strictly_lower(diag(beta) K K^T))^-1 diag(beta) for k [..., C, K], beta [..., C]."""
    c = k.shape[-2]
    out = torch.promote_types(k.dtype, beta.dtype)
    # solve_triangular has no float16/bfloat16 kernel (CPU or CUDA), and under autocast its two
    # sides would come out in different dtypes: solve in at least float32, autocast off.
    dt = torch.promote_types(out, torch.float32)
    with torch.autocast(k.device.type, enabled=False):
        k, beta = k.to(dt), beta.to(dt)
        eye = torch.eye(c, dtype=dt, device=k.device)
        lower = ((beta.unsqueeze(-1) * k) @ k.transpose(-1, -2)).tril(-1)
        tm = torch.linalg.solve_triangular(eye + lower, torch.diag_embed(beta), upper=False, unitriangular=True)
    return tm.to(out)


def delta_chunk(q, k, v, beta, initial_state=None, chunk_size: int = 64):
    """Returns (o [B,H,T,V], final state [B,H,K,V])."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    n = -(-t // c)
    # padded tail: k = 0, beta = 0 -> the transform rows are zero, state untouched
    q, k, v = (_pad_time(x, n * c) for x in (q, k, v))
    beta = _pad_time(beta.unsqueeze(-1), n * c).squeeze(-1)
    qc, kc, vc = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))
    tm = _ut_transform(kc, beta.reshape(b, h, n, c))
    u, w = tm @ vc, tm @ kc
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    qk = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
    s = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    u, w, qs, ks, qk = (x.unbind(2) for x in (u, w, qc, kc, qk))  # see gla_chunk: no per-chunk indexing
    for i in range(n):
        v_new = u[i] - w[i] @ s  # values corrected by what the state already predicts
        outs.append(qs[i] @ s + qk[i] @ v_new)
        s = s + ks[i].transpose(-1, -2) @ v_new
    return torch.stack(outs, dim=2).reshape(b, h, n * c, dv)[:, :, :t], s


def delta_step(q_t, k_t, v_t, beta_t, state):
    """q_t, k_t [B,H,K], v_t [B,H,V], beta_t [B,H], state [B,H,K,V]."""
    pred = torch.einsum("bhk,bhkv->bhv", k_t, state)
    state = state + k_t.unsqueeze(-1) * (beta_t.unsqueeze(-1) * (v_t - pred)).unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q_t, state), state


def delta_step_fused(q_t, k_t, v_t, beta_t, state):
    """``delta_step`` in fewer, larger ops (the decode path; tests compare it with ``delta_step``).

    One bmm reads k^T S and q^T S together; the output uses S_new^T q = S^T q + (q.k) u with the
    correction u = beta (v - S^T k), so S is read once and written once (one baddbmm)."""
    b, h, dk, dv = state.shape
    s = state.reshape(b * h, dk, dv)
    r = torch.bmm(torch.stack((k_t, q_t), dim=-2).view(b * h, 2, dk), s)  # [BH, 2, V]
    u = (v_t.reshape(b * h, dv) - r[:, 0]) * beta_t.reshape(b * h, 1)
    o = torch.addcmul(r[:, 1], torch.linalg.vecdot(q_t, k_t).reshape(b * h, 1), u)
    s = torch.baddbmm(s, k_t.reshape(b * h, dk, 1), u.unsqueeze(1))
    return o.view(b, h, dv), s.view(b, h, dk, dv)


def delta_recurrent(q, k, v, beta, initial_state=None):
    """Token-by-token form (``delta_step_fused``). Returns (o [B,H,T,V], final state [B,H,K,V])."""
    b, h, t, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outs = []
    for i in range(t):
        o_t, s = delta_step_fused(q[:, :, i], k[:, :, i], v[:, :, i], beta[:, :, i], s)
        outs.append(o_t)
    return (outs[0].unsqueeze(2) if t == 1 else torch.stack(outs, dim=2)), s


def delta_matrix(q, k, beta):
    """A [B,H,T,T]: one T x T unit-lower-triangular solve per head (differentiable)."""
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    qk = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    return qk @ _ut_transform(k, beta)
