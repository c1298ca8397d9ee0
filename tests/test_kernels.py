"""Kernels against independent float64 references: naive loops written here, and FLA's naive.py.

Every kernel family is checked in its three forms (chunked, recurrent, materialised matrix) at
lengths that are and are not multiples of the chunk size.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linearize import kernels as K

from fla_naive import fla_naive  # noqa: E402  (tests/fla_naive.py)

LENGTHS = [1, 17, 64, 100]
CHUNK = 16  # small chunks so 17, 64 and 100 cross several chunk boundaries
B, H, D, DV = 2, 3, 8, 5
def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def close(a, b, tol=1e-9):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3e} (scale {scale:.3e})"


# ---------------- independent naive references (float64, explicit products) -----------------
def naive_gla(q, k, v, g):
    """o_i = sum_{j<=i} sum_d q_id k_jd prod_{j<l<=i} exp(g_ld) v_j, by explicit products."""
    b, h, t, dk = q.shape
    dec = torch.ones_like(q) if g is None else g.exp().expand_as(q)
    o = torch.zeros(b, h, t, v.shape[-1], dtype=q.dtype)
    a = torch.zeros(b, h, t, t, dtype=q.dtype)
    for i in range(t):
        prod = torch.ones(b, h, dk, dtype=q.dtype)
        for j in range(i, -1, -1):
            a[:, :, i, j] = (q[:, :, i] * k[:, :, j] * prod).sum(-1)
            prod = prod * dec[:, :, j]
        o[:, :, i] = (a[:, :, i, :, None] * v).sum(2)
    return o, a


def naive_delta(q, k, v, beta):
    b, h, t, dk = q.shape
    s = torch.zeros(b, h, dk, v.shape[-1], dtype=q.dtype)
    outs = []
    for i in range(t):
        kt = k[:, :, i]
        err = v[:, :, i] - torch.einsum("bhk,bhkv->bhv", kt, s)
        s = s + beta[:, :, i, None, None] * kt[..., None] * err[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, i], s))
    return torch.stack(outs, 2), s


def naive_mlstm(q, k, v, lf, ig):
    """Unstabilised mLSTM (float64 keeps it finite at these sizes): h = C q / max(|n.q|, 1)."""
    b, h, t, dk = q.shape
    c = torch.zeros(b, h, dk, v.shape[-1], dtype=q.dtype)
    n = torch.zeros(b, h, dk, dtype=q.dtype)
    outs = []
    for i in range(t):
        f, inp = lf[:, :, i].exp(), ig[:, :, i].exp()
        c = f[..., None, None] * c + inp[..., None, None] * k[:, :, i, :, None] * v[:, :, i, None, :]
        n = f[..., None] * n + inp[..., None] * k[:, :, i]
        num = torch.einsum("bhk,bhkv->bhv", q[:, :, i], c)
        den = (q[:, :, i] * n).sum(-1).abs().clamp_min(1.0)
        outs.append(num / den[..., None])
    return torch.stack(outs, 2)


def inputs(t, seed=0, decay="channel"):
    torch.manual_seed(seed)
    q, k, v = rand(B, H, t, D), rand(B, H, t, D), rand(B, H, t, DV)
    if decay == "channel":
        g = F.logsigmoid(rand(B, H, t, D) + 2.0)
    elif decay == "scalar":
        g = F.logsigmoid(rand(B, H, t, 1) + 2.0)
    else:
        g = None
    return q, k, v, g


# ------------------------------------ gated family -------------------------------------------
@pytest.mark.parametrize("decay", ["channel", "scalar", "none"])
@pytest.mark.parametrize("t", LENGTHS)
def test_gated_forms_match_naive(t, decay):
    q, k, v, g = inputs(t, decay=decay)
    ref_o, ref_a = naive_gla(q, k, v, g)
    o_c, s_c = K.gla_chunk(q, k, v, g, chunk_size=CHUNK)
    o_r, s_r = K.gla_recurrent(q, k, v, g)
    close(o_c, ref_o)
    close(o_r, ref_o)
    close(s_c, s_r)
    close(K.gla_matrix(q, k, g, chunk_size=CHUNK), ref_a)


def test_gated_strong_decay_long_sequence_stays_finite():
    """Cumulative decay underflows far below float range: log-space segment sums must not care."""
    q, k, v, _ = inputs(300)
    g = torch.full((B, H, 300, D), -5.0, dtype=torch.float64)  # prod over 300 steps = e^-1500
    o, _ = K.gla_chunk(q, k, v, g, chunk_size=64)
    a = K.gla_matrix(q, k, g, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(a).all()
    close(o, K.gla_recurrent(q, k, v, g)[0])
    close(a @ v, o)


@pytest.mark.parametrize("rate", [0.05, 3.0, 12.0, 40.0])
def test_gated_per_channel_decay_every_weight_path(rate):
    """Per-channel decay of a given strength exercises each path of ``_weights``: a 64-chunk
    factorised at once (0.05 per step), blocks of 16 (3), of 4 (12), and exact segment sums
    (40 per step: even a 4-block's span is beyond the factorisation limit). Half the channels
    decay weakly, so a strong channel must not spoil the weak ones' precision."""
    t = 100
    q, k, v, _ = inputs(t)
    torch.manual_seed(3)
    g = -rate * torch.rand(B, H, t, D, dtype=torch.float64)
    g[..., : D // 2] *= 0.01
    ref_o, ref_a = naive_gla(q, k, v, g)
    close(K.gla_chunk(q, k, v, g, chunk_size=64)[0], ref_o)
    close(K.gla_matrix(q, k, g, chunk_size=64), ref_a)
    # float32 against the float64 reference: the factorised path must keep float32 precision
    o32, _ = K.gla_chunk(*(x.float() for x in (q, k, v, g)), chunk_size=64)
    close(o32.double(), ref_o, tol=1e-5)


def test_gated_factorisation_limit_is_respected():
    """The path choice reads the decay span: one channel decaying strongly in one block forbids
    factorising that whole call, a weak decay allows it."""
    from linearize.kernels import gated

    g = torch.full((1, 1, 64, 4), -0.01)
    assert gated._factorisable(g)
    g[0, 0, 40, 2] = -2 * gated.FACTOR_LIMIT
    assert not gated._factorisable(g)


@pytest.mark.parametrize("t", [17, 100])
def test_gated_initial_state_continues_a_prompt(t):
    q, k, v, g = inputs(t)
    full, s_full = K.gla_chunk(q, k, v, g, chunk_size=CHUNK)
    cut = t // 2
    first, s = K.gla_chunk(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], g[:, :, :cut], chunk_size=CHUNK)
    second, s2 = K.gla_chunk(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], g[:, :, cut:], initial_state=s,
                             chunk_size=CHUNK)
    close(torch.cat([first, second], 2), full)
    close(s2, s_full)


@pytest.mark.parametrize("t", [17, 64])
def test_gated_normaliser(t):
    q, k, v, _ = inputs(t, decay="none")
    q, k = q.exp(), k.exp()  # positive features, as a feature map gives
    ref_o, ref_a = naive_gla(q, k, v, None)
    ref_n, _ = naive_gla(q, k, torch.ones_like(v[..., :1]), None)
    ref = ref_o / (ref_n + 1e-6)
    for mode in ("chunk", "recurrent"):
        o, _ = K.gated_attention(q, k, v, None, mode=mode, chunk_size=CHUNK, normalize=True, backend="torch")
        close(o, ref)
    a = K.gated_matrix(q, k, None, normalize=True)
    close(a @ v, ref)


@pytest.mark.parametrize("t", [17, 100])
def test_gla_against_fla_naive(t):
    fla = fla_naive("gla")
    q, k, v, g = inputs(t)
    # FLA: [B,T,H,K] layout, scale K^-1/2 applied inside; we pass the scale through q
    o_ref, s_ref = fla.naive_recurrent_gla(*(x.transpose(1, 2) for x in (q, k, v, g)), output_final_state=True)
    o, s = K.gla_chunk(q * D ** -0.5, k, v, g, chunk_size=CHUNK)
    close(o, o_ref.transpose(1, 2).double(), tol=1e-4)  # FLA computes in float32
    close(s, s_ref.double(), tol=1e-4)


@pytest.mark.parametrize("t", [17, 100])
def test_simple_gla_against_fla_naive(t):
    fla = fla_naive("simple_gla")
    q, k, v, g = inputs(t, decay="scalar")
    o_ref, _ = fla.naive_recurrent_simple_gla(*(x.transpose(1, 2) for x in (q, k, v)), g[..., 0].transpose(1, 2))
    o, _ = K.gla_chunk(q * D ** -0.5, k, v, g, chunk_size=CHUNK)
    close(o, o_ref.transpose(1, 2).double(), tol=1e-4)


@pytest.mark.parametrize("t", [17, 100])
def test_retention_against_fla_naive(t):
    fla = fla_naive("retention")
    q, k, v, _ = inputs(t, decay="none")
    v = rand(B, H, t, D)
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    g = gamma.log().view(1, H, 1, 1).expand(B, H, t, 1)
    o_ref = fla.naive_retention(q, k, v)  # [B,H,T,D] layout
    close(K.gla_chunk(q * D ** -0.5, k, v, g, chunk_size=CHUNK)[0], o_ref.double(), tol=1e-4)
    close(K.gla_matrix(q * D ** -0.5, k, g, chunk_size=CHUNK) @ v, o_ref.double(), tol=1e-4)


@pytest.mark.parametrize("t", [17, 100])
def test_linear_attn_against_fla_naive(t):
    fla = fla_naive("linear_attn")
    q, k, v, _ = inputs(t, decay="none")
    o_ref, _ = fla.naive_recurrent_linear_attn(*(x.transpose(1, 2) for x in (q, k, v)), scale=1.0)
    close(K.gla_chunk(q, k, v, None, chunk_size=CHUNK)[0], o_ref.transpose(1, 2).double(), tol=1e-4)


@pytest.mark.parametrize("t", [17, 64])
def test_rebased_kernel_against_fla_naive(t):
    """ReBased's kernel (s q.k)^2 equals a dot product of quadratic features phi(x) = vec(x x^T)."""
    fla = fla_naive("rebased")
    q, k, v, _ = inputs(t, decay="none")
    s = D ** -0.5
    o_ref = fla.naive_parallel_rebased(q, k, v, scale=s, use_norm=True)
    phi = lambda x: (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # noqa: E731
    o, _ = K.gated_attention(phi(q * s), phi(k), v, None, chunk_size=CHUNK, normalize=True, backend="torch")
    close(o, o_ref.double(), tol=1e-4)


@pytest.mark.parametrize("t", [17, 100])
def test_square_qk_intra_weights_match_naive(t):
    """square_qk=(a, b): intra-chunk weights (a.b)^2 in the head dim equal phi(a).phi(b); the
    output (with an initial state) matches the naive loop."""
    q, k, v, _ = inputs(t, decay="none")
    phi = lambda x: (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # noqa: E731
    s0 = rand(B, H, D * D, DV)
    ref_o, _ = naive_gla(phi(q), phi(k), v, None)
    ref_o = ref_o + phi(q) @ s0
    o, s = K.gla_chunk(phi(q), phi(k), v, None, s0, chunk_size=4, square_qk=(q, k))
    close(o, ref_o)
    close(s, K.gla_recurrent(phi(q), phi(k), v, None, s0)[1])


def test_hgrn_against_fla_naive():
    """HGRN (elementwise gated recurrence) is gated attention with q = k = 1 per channel."""
    fla = fla_naive("hgrn")
    t = 37
    torch.manual_seed(1)
    x, g = rand(B, t, D), F.logsigmoid(rand(B, t, D) + 2)
    o_ref, _ = fla.naive_recurrent_hgrn(x, g)  # h_t = exp(g_t) h_{t-1} + x_t
    # one head per channel, K = 1: state [1, 1], decay exp(g), input x
    q = torch.ones(B, D, t, 1, dtype=torch.float64)
    o, _ = K.gla_chunk(q, q.clone(), x.transpose(1, 2).unsqueeze(-1), g.transpose(1, 2).unsqueeze(-1), chunk_size=CHUNK)
    close(o[..., 0].transpose(1, 2), o_ref.double(), tol=1e-4)


# ------------------------------------ delta rule ---------------------------------------------
def delta_inputs(t, seed=0):
    torch.manual_seed(seed)
    q, k, v = rand(B, H, t, D), F.normalize(rand(B, H, t, D), dim=-1), rand(B, H, t, DV)
    return q, k, v, torch.sigmoid(rand(B, H, t))


@pytest.mark.parametrize("t", LENGTHS)
def test_delta_forms_match_naive(t):
    q, k, v, beta = delta_inputs(t)
    ref, s_ref = naive_delta(q, k, v, beta)
    o_c, s_c = K.delta_chunk(q, k, v, beta, chunk_size=CHUNK)
    o_r, s_r = K.delta_recurrent(q, k, v, beta)
    close(o_c, ref)
    close(o_r, ref)
    close(s_c, s_ref)
    close(s_r, s_ref)
    close(K.delta_matrix(q, k, beta) @ v, ref)


def test_delta_chunk_runs_in_bf16_against_the_float64_reference():
    # bf16 autocast on the CPU used to raise (no half-precision triangular solve); the chunked
    # form now solves in float32 and must stay within bf16 rounding of the float64 recurrence.
    q, k, v, beta = delta_inputs(70)
    ref, _ = naive_delta(q, k, v, beta)
    o, _ = K.delta_chunk(*(x.bfloat16() for x in (q, k, v, beta)), chunk_size=CHUNK)
    assert o.dtype == torch.bfloat16
    err = (o.double() - ref).norm() / ref.norm()
    assert err < 3e-2, err


def test_delta_initial_state_continues_a_prompt():
    q, k, v, beta = delta_inputs(50)
    full, _ = K.delta_chunk(q, k, v, beta, chunk_size=CHUNK)
    a, s = K.delta_chunk(q[:, :, :20], k[:, :, :20], v[:, :, :20], beta[:, :, :20], chunk_size=CHUNK)
    b, _ = K.delta_chunk(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], beta[:, :, 20:], initial_state=s, chunk_size=CHUNK)
    close(torch.cat([a, b], 2), full)


@pytest.mark.parametrize("t", [17, 100])
def test_delta_against_fla_naive(t):
    fla = fla_naive("delta_rule")
    q, k, v, beta = delta_inputs(t)
    o_ref, s_ref = fla.delta_rule_recurrence(q, k, v, beta)  # [B,H,T,K] layout, q scaled by K^-1/2
    o, s = K.delta_chunk(q * D ** -0.5, k, v, beta, chunk_size=CHUNK)
    close(o, o_ref.double(), tol=1e-4)
    close(s, s_ref.double(), tol=1e-4)


# ------------------------------------ mLSTM --------------------------------------------------
def mlstm_inputs(t, seed=0):
    torch.manual_seed(seed)
    q, k, v = rand(B, H, t, D), rand(B, H, t, D) / math.sqrt(D), rand(B, H, t, DV)
    lf = F.logsigmoid(rand(B, H, t) + 3.0)
    ig = rand(B, H, t) - 1.0
    return q, k, v, lf, ig


@pytest.mark.parametrize("t", LENGTHS)
def test_mlstm_forms_match_naive(t):
    q, k, v, lf, ig = mlstm_inputs(t)
    ref = naive_mlstm(q, k, v, lf, ig)
    o_c, st_c = K.mlstm_chunk(q, k, v, lf, ig, chunk_size=CHUNK)
    o_r, st_r = K.mlstm_recurrent(q, k, v, lf, ig)
    close(o_c, ref)
    close(o_r, ref)
    for a, b in zip(st_c, st_r):
        close(a, b)
    close(K.mlstm_matrix(q, k, lf, ig) @ v, ref)


def test_mlstm_stabiliser_handles_huge_input_gates():
    """Input-gate pre-activations of 500 overflow exp() in float64 without the max-state."""
    q, k, v, lf, ig = mlstm_inputs(40)
    ig = ig + 500.0
    o_c, _ = K.mlstm_chunk(q, k, v, lf, ig, chunk_size=CHUNK)
    o_r, _ = K.mlstm_recurrent(q, k, v, lf, ig)
    assert torch.isfinite(o_c).all()
    close(o_c, o_r)
    close(K.mlstm_matrix(q, k, lf, ig) @ v, o_r)


def test_mlstm_initial_state_continues_a_prompt():
    q, k, v, lf, ig = mlstm_inputs(50)
    full, _ = K.mlstm_chunk(q, k, v, lf, ig, chunk_size=CHUNK)
    a, s = K.mlstm_chunk(*(x[:, :, :20] for x in (q, k, v, lf, ig)), chunk_size=CHUNK)
    b, _ = K.mlstm_recurrent(*(x[:, :, 20:] for x in (q, k, v, lf, ig)), initial_state=s)
    close(torch.cat([a, b], 2), full)


# ------------------------------------ gradients, dispatch ------------------------------------
def test_gradients_finite_at_512():
    torch.manual_seed(0)
    t = 512
    q, k, v = (torch.randn(1, 2, t, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    graw = torch.randn(1, 2, t, 16, dtype=torch.float64, requires_grad=True)
    beta_raw = torch.randn(1, 2, t, dtype=torch.float64, requires_grad=True)
    g = F.logsigmoid(graw + 3)
    losses = [
        K.gla_chunk(q, k, v, g)[0].square().mean(),
        K.gla_matrix(q, k, g).square().mean(),
        K.delta_chunk(q, F.normalize(k, dim=-1), v, beta_raw.sigmoid())[0].square().mean(),
        K.delta_matrix(q, F.normalize(k, dim=-1), beta_raw.sigmoid()).square().mean(),
        K.mlstm_chunk(q, k / 4, v, g[..., 0], beta_raw)[0].square().mean(),
        K.mlstm_matrix(q, k / 4, g[..., 0], beta_raw).square().mean(),
    ]
    sum(losses).backward()
    for x in (q, k, v, graw, beta_raw):
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_forcing_fla_without_cuda_is_an_error():
    q, k, v, g = inputs(8)
    with pytest.raises(RuntimeError, match="CUDA"):
        K.gated_attention(q, k, v, g, backend="fla")
    with pytest.raises(ValueError, match="no kernel for mLSTM"):
        K.mlstm(q, k, v, g[..., 0], g[..., 0], backend="fla")
    with pytest.raises(ValueError, match="backend must be one of"):
        K.gated_attention(q, k, v, g, backend="triton")


def test_auto_backend_choice():
    """auto: ours on the CPU; on CUDA, ours for feature maps wider than FLA's kernels handle."""
    assert not K.use_fla("auto", torch.device("cpu"), "op")
    assert not K.use_fla("auto", torch.device("cuda"), "op", key_dim=2080)
    assert not K.use_fla("auto", torch.device("cuda"), "mLSTM", fla_has_op=False)
    assert not K.use_fla("torch", torch.device("cuda"), "op")
