"""Every registered mixer: its three forms agree, states carry generation on, the registry and
the teacher-copy contract hold, gradients stay finite; CUDA: FLA kernels agree with ours."""
from __future__ import annotations

import math

import pytest
import torch

from linearize import mixers
from linearize.mixers import MixerConfig

from fla_naive import fla_naive

NAMES = mixers.available()
LENGTHS = [1, 17, 64, 100]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, CHUNK = 32, 4, 2, 8, 16


def make(name, seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    cfg = MixerConfig(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, chunk_size=CHUNK, backend="torch", options=options)
    m = mixers.build(name, cfg).to(dtype)
    with torch.no_grad():  # move every parameter off its special init (identity convs, zero aug ...)
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def rope(t, batch=2, dtype=torch.float64, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=dtype) / HEAD_DIM)
    ang = torch.arange(t, dtype=dtype)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)[None].expand(batch, -1, -1)
    return emb.cos(), emb.sin()


def close(a, b, tol=1e-9):
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("name", NAMES)
def test_chunk_recurrent_and_matrix_agree(name, t):
    m = make(name)
    x = torch.randn(2, t, HIDDEN, dtype=torch.float64)
    pe = rope(t)
    chunk = m.core(x, pe, mode="chunk")
    rec = m.core(x, pe, mode="recurrent")
    a = m.mixing_matrix(x, pe)
    assert a.shape == (2, HEADS, t, t)
    assert torch.all(a.triu(1) == 0), "mixing matrix must be causal (lower triangular)"
    close(chunk.o, rec.o)
    close(a @ chunk.v, chunk.o)


@pytest.mark.parametrize("name", NAMES)
def test_stepwise_generation_matches_parallel_forward(name):
    """Prefix in chunk mode, then token-by-token with the returned state == one parallel pass."""
    t, cut = 37, 20
    m = make(name, seed=1)
    x = torch.randn(2, t, HIDDEN, dtype=torch.float64)
    cos, sin = rope(t)
    y_full, s_full = m(x, (cos, sin), mode="chunk")
    y0, s = m(x[:, :cut], (cos[:, :cut], sin[:, :cut]), mode="chunk")
    ys = [y0]
    for i in range(cut, t):
        y_t, s = m(x[:, i:i + 1], (cos[:, i:i + 1], sin[:, i:i + 1]), state=s)
        ys.append(y_t)
    close(torch.cat(ys, 1), y_full)
    assert s.keys() == s_full.keys()
    for key in s:
        close(s[key], s_full[key])
    # a fresh state from init_state gives the same as no state
    y_init, _ = m(x[:, :5], (cos[:, :5], sin[:, :5]), state=m.init_state(2, x.device, x.dtype))
    close(y_init, y_full[:, :5])


@pytest.mark.parametrize("name", [n for n in NAMES if n != "softmax"])
def test_recurrent_state_has_constant_size(name):
    m = make(name)
    x = torch.randn(1, 30, HIDDEN, dtype=torch.float64)
    cos, sin = rope(30, batch=1)
    _, s10 = m(x[:, :10], (cos[:, :10], sin[:, :10]))
    _, s30 = m(x, (cos, sin))
    assert {k: v.shape for k, v in s10.items()} == {k: v.shape for k, v in s30.items()}
    init = m.init_state(1, x.device, x.dtype)
    assert {k: v.shape for k, v in init.items()} == {k: v.shape for k, v in s30.items()}


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_at_512(name):
    m = make(name, dtype=torch.float32)
    t = 512
    x = torch.randn(1, t, HIDDEN, requires_grad=True)
    pe = rope(t, batch=1, dtype=torch.float32)
    y, _ = m(x, pe)
    loss = y.square().mean() + m.mixing_matrix(x, pe).square().mean()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for n, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n


# ------------------------------------------------------------------ registry and contract
def test_registry_holds_the_papers_students():
    from linearize.paper import PAPER_PARAMS_M  # the paper's ten students, by our names

    assert set(PAPER_PARAMS_M) <= set(NAMES)
    assert mixers.get("llama") is mixers.get("softmax") and mixers.get("mlstm") is mixers.get("xlstm")
    with pytest.raises(KeyError) as err:
        mixers.get("transformer")
    for n in NAMES:
        assert n in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_what_the_class_declares(name):
    s, cls = mixers.spec(name), mixers.get(name)
    assert issubclass(cls, mixers.TokenMixer) and cls.name == name
    assert (s.cls, s.module) == (cls.__qualname__, cls.__module__)
    # the study's Table 1: HGRN2 and MetaLA have no key projection
    assert s.has_key == (name not in {"hgrn2", "metala"})
    assert cls.matrix_note, "every mixer says what its A means"
    assert s.paper, "every mixer cites where it comes from"


@pytest.mark.parametrize("name", NAMES)
def test_copy_from_llama_attention(name):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, intermediate_size=64)
    attn = LlamaAttention(cfg, 0).double()
    m = make(name)
    notes = m.copy_from_attention(attn, qkv_copy=True)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if hasattr(m, proj):
            assert torch.equal(getattr(m, proj).weight, getattr(attn, proj).weight), proj
            assert any(n.startswith(f"{proj}: copied") for n in notes)
        else:
            assert any(n.startswith(f"{proj}: not copied") for n in notes), notes
    assert hasattr(m, "k_proj") == mixers.spec(name).has_key
    m2 = make(name, seed=3)
    before = m2.q_proj.weight.clone()
    notes = m2.copy_from_attention(attn, qkv_copy=False)
    assert torch.equal(m2.q_proj.weight, before) and "qkv_copy=False" in notes[0]


def test_softmax_mixer_equals_llama_attention():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, intermediate_size=64, attn_implementation="eager")
    torch.manual_seed(0)
    attn = LlamaAttention(cfg, 0).double()
    m = make("softmax")
    m.copy_from_attention(attn)
    t = 23
    x = torch.randn(2, t, HIDDEN, dtype=torch.float64)
    pe = rope(t)
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    y_ref, w_ref = attn(x, pe, attention_mask=mask)
    # HF's eager attention takes its softmax in float32 whatever the input dtype: hence 1e-6
    close(m(x, pe)[0], y_ref, tol=1e-6)
    close(m.mixing_matrix(x, pe), w_ref, tol=1e-6)


def test_rope_option_rotates_queries_and_keys():
    """With rope=True and no decay/feature map in the way, ReBased's pre-square scores see RoPE."""
    m = make("gla", rope=True)
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    with pytest.raises(ValueError, match="position_embeddings"):
        m(x)
    a_rope = m.mixing_matrix(x, rope(9, batch=1))
    a_plain = make("gla").mixing_matrix(x, rope(9, batch=1))
    assert not torch.allclose(a_rope, a_plain)


def test_retnet_matrix_is_gamma_powers_times_scores():
    m = make("retnet")
    t = 20
    x = torch.randn(1, t, HIDDEN, dtype=torch.float64)
    q = m.q_proj(x).view(1, t, HEADS, HEAD_DIM).transpose(1, 2)
    k = m.k_proj(x).view(1, t, KV_HEADS, HEAD_DIM).transpose(1, 2).repeat_interleave(2, 1)
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(HEADS, dtype=torch.float64))
    i = torch.arange(t, dtype=torch.float64)
    decay = gamma.view(-1, 1, 1) ** (i[:, None] - i[None, :]).clamp_min(0) * (i[:, None] >= i[None, :])
    close(m.mixing_matrix(x), (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM) * decay)


def test_mamba2_skip_sits_on_the_diagonal():
    m = make("mamba2")
    x = torch.randn(1, 12, HIDDEN, dtype=torch.float64)
    a = m.mixing_matrix(x)
    with torch.no_grad():
        m.D.add_(1.5)
    close(m.mixing_matrix(x) - a, 1.5 * torch.eye(12, dtype=torch.float64).expand_as(a))


def test_rebased_matches_fla_naive_parallel_rebased():
    """Our d(d+1)/2 triangle features give exactly FLA's (s q~.k~)^2 normalised kernel."""
    fla = fla_naive("rebased")
    m = make("rebased")
    x = torch.randn(2, 40, HIDDEN, dtype=torch.float64)
    q, k, v = m.heads(m.q_proj(x)), m.heads(m.k_proj(x), kv=True), m.heads(m.v_proj(x), kv=True)
    aff = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:]) * m.gamma + m.beta  # noqa: E731
    ref = fla.naive_parallel_rebased(aff(q), aff(k), v, use_norm=True)  # float32 inside
    close(m.core(x).o, ref.double(), tol=1e-4)


def test_forcing_fla_on_cpu_is_a_clear_error():
    cfg = MixerConfig(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, backend="fla")
    m = mixers.build("gla", cfg)
    with pytest.raises(RuntimeError, match="CUDA"):
        m(torch.randn(1, 4, HIDDEN))


# ------------------------------------------------------------------ CUDA: FLA against ours
# xlstm: FLA has no mLSTM; rebased: 2080 quadratic features, which "auto" keeps on our kernels
FLA_MIXERS = ["gla", "hgrn2", "retnet", "mamba2", "metala", "deltanet", "hedgehog"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", FLA_MIXERS)
def test_fla_kernels_match_ours_on_cuda(name):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: FLA's Triton kernels only run on a GPU")
    pytest.importorskip("fla.ops")
    m = make(name, dtype=torch.float32).cuda()
    x = torch.randn(2, 200, HIDDEN, device="cuda")
    pe = tuple(p.cuda().float() for p in rope(200))
    m.config.backend = "torch"
    ref = m.core(x, pe).o
    m.config.backend = "fla"
    out = m.core(x, pe).o
    close(out, ref, tol=2e-3)

