"""ReBased's quadratic feature map and chunked form against float64 references that never form
features: the kernel (x.y)^2 itself, and the normalised quadratic-kernel attention."""
from __future__ import annotations

import math

import pytest
import torch

from linearize import mixers
from linearize.mixers import MixerConfig
from linearize.mixers import rebased as R


@pytest.mark.parametrize("d", [1, 2, 3, 7, 8, 16])
def test_quadratic_features_give_the_squared_dot_product_and_its_gradient(d, monkeypatch):
    monkeypatch.setattr(R, "_ROWS_PER_BLOCK", 5)  # several blocks, the last one partial
    torch.manual_seed(d)
    x = torch.randn(2, 3, 4, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 6, d, dtype=torch.float64, requires_grad=True)
    phi_x, phi_y = R.quadratic_features(x), R.quadratic_features(y)
    assert phi_x.shape[-1] == d * (d + 1) // 2
    ker = phi_x @ phi_y.transpose(-1, -2)
    ref = (x @ y.transpose(-1, -2)).square()
    assert torch.allclose(ker, ref, rtol=1e-12, atol=1e-12)
    c = torch.randn_like(ref)
    got = torch.autograd.grad((ker * c).sum(), (x, y))
    want = torch.autograd.grad((ref * c).sum(), (x, y))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(R.quadratic_features, (x[:1, :1].detach().clone().requires_grad_(),))


def _perturbed_mixer_and_input(heads, kv_heads, seed, hidden=32, d=8, t=50):
    """A float64 ReBased mixer with its parameters moved off their initial values, an input
    that requires grad, and the masked [T, T] reference of its core output:
    sum_j (s q~.k~_j)^2 v_j / (sum + eps)."""
    torch.manual_seed(seed)
    m = mixers.build("rebased", MixerConfig(hidden, heads, kv_heads, d, chunk_size=16, backend="torch")).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, t, hidden, dtype=torch.float64, requires_grad=True)

    def reference():
        q, k = m.heads(m.q_proj(x)), m.heads(m.k_proj(x), kv=True)
        v = m.heads(m.v_proj(x), kv=True)
        a = (m.normed(q) @ m.normed(k).transpose(-1, -2) / math.sqrt(d)).square()
        a = a * torch.ones(t, t, dtype=torch.bool).tril()
        return a @ v / (a.sum(-1, keepdim=True) + m.eps)

    return m, x, reference


@pytest.mark.parametrize("max_t", [R.QUADRATIC_MAX_T, 16])  # T = 50: the T x T form, then the chunked one
def test_core_matches_float64_quadratic_attention(max_t, monkeypatch):
    """Outputs and every gradient of the core (the T x T form, then the chunked one) equal
    sum_j (s q~.k~_j)^2 v_j / (sum + eps), computed as a masked [T, T] matrix (no features, no
    chunks, no strips)."""
    monkeypatch.setattr(R, "QUADRATIC_MAX_T", max_t)
    monkeypatch.setattr(R, "PARALLEL_BLOCK", 16)  # 50 tokens: strips of 16, 16, 16, 2
    heads, d, t = 4, 8, 50
    m, x, reference = _perturbed_mixer_and_input(heads, 2, seed=0)
    params = [x, *m.parameters()]
    w = torch.randn(2, heads, t, d, dtype=torch.float64)
    o = m.core(x, mode="chunk").o
    o_ref = reference()
    assert torch.allclose(o, o_ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad((o * w).sum(), params, allow_unused=True)
    want = torch.autograd.grad((o_ref * w).sum(), params, allow_unused=True)
    for p, a, b in zip(params, got, want):
        if b is None:  # o_proj: not part of the core
            assert a is None
            continue
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), tuple(p.shape)


def test_chunked_state_equals_the_recurrent_state():
    """The chunked form keeps one state per KV head; the state it hands on (repeated to every
    query head) is the token-by-token recurrence's on the repeated heads."""
    torch.manual_seed(1)
    m = mixers.build("rebased", MixerConfig(32, 4, 2, 8, chunk_size=16, backend="torch")).double()
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    with torch.no_grad():
        y_chunk, s_chunk = m(x, mode="chunk")
        y_rec, s_rec = m(x, mode="recurrent")
    assert s_chunk["S"].shape == s_rec["S"].shape == (2, 4, 36, 9)
    assert torch.allclose(s_chunk["S"], s_rec["S"], rtol=1e-10, atol=1e-10)
    assert torch.allclose(y_chunk, y_rec, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("max_t", [R.QUADRATIC_MAX_T, 16])  # T = 50: the T x T form, then the chunked one
def test_stateless_forward_matches_float64_quadratic_attention(max_t, monkeypatch):
    """A forward that keeps no state (no cache, training) takes the T x T form up to
    QUADRATIC_MAX_T tokens and the chunked form beyond: outputs and gradients equal the masked
    [T, T] reference either way, and no state comes back."""
    monkeypatch.setattr(R, "QUADRATIC_MAX_T", max_t)
    heads, d, t = 6, 8, 50
    m, x, reference = _perturbed_mixer_and_input(heads, 2, seed=2)
    y_ref = m.o_proj(reference().transpose(1, 2).reshape(2, t, heads * d))
    y, state = m(x, keep_state=False)
    assert state is None
    assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    params = [x, *m.parameters()]
    w = torch.randn_like(y)
    got = torch.autograd.grad((y * w).sum(), params)
    want = torch.autograd.grad((y_ref * w).sum(), params)
    for p, g1, g2 in zip(params, got, want):
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-10), tuple(p.shape)


def _masked_quadratic_reference(a, b, v, eps):
    g = a.shape[1] // b.shape[1]
    b, v = b.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    w = (a @ b.transpose(-1, -2)).square().tril()
    return w @ v / (w.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("block", [1, 5, 16, 64])
def test_strip_form_equals_the_masked_matrix_with_gradients(block, monkeypatch):
    """The T x T form in strips of ``block`` query rows (the last strip partial for 5 and 16,
    one strip for 64), with 6 query heads on 2 KV heads: outputs and the gradients of a, b, v
    from its hand-written backward equal autograd through the whole masked matrix (float64)."""
    monkeypatch.setattr(R, "PARALLEL_BLOCK", block)
    torch.manual_seed(3)
    a = torch.randn(2, 6, 37, 8, dtype=torch.float64, requires_grad=True)
    b, v = (torch.randn(2, 2, 37, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    o = R.quadratic_parallel(a, b, v, 1e-6)
    o_ref = _masked_quadratic_reference(a, b, v, 1e-6)
    assert torch.allclose(o, o_ref, rtol=1e-11, atol=1e-12)
    w = torch.randn_like(o)
    got = torch.autograd.grad((o * w).sum(), (a, b, v))
    want = torch.autograd.grad((o_ref * w).sum(), (a, b, v))
    for name, g1, g2 in zip("abv", got, want):
        assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-11), name


def test_strip_form_passes_gradcheck(monkeypatch):
    """Finite differences against the strip form's backward (float64, 3 strips)."""
    monkeypatch.setattr(R, "PARALLEL_BLOCK", 3)
    torch.manual_seed(4)
    a = torch.randn(1, 4, 8, 3, dtype=torch.float64, requires_grad=True)
    b, v = (torch.randn(1, 2, 8, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b, v: R.quadratic_parallel(a, b, v, 1e-3), (a, b, v))
