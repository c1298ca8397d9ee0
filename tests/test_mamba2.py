"""Our Mamba2 mixer against transformers' ``Mamba2Mixer`` (the reference implementation of the
SSD layer) with the same weights, including the per-group gated RMSNorm of official Mamba-2.

The two layers differ in layout only where the mapping below bridges them: transformers packs
z, x, B, C and dt into one ``in_proj`` and one depthwise conv over [x, B, C]; ours keeps Llama
names (z_proj, v_proj = x, k_proj = B, q_proj = C, dt_proj) with one short conv each. Mamba-2
has one C per group, ours one per head, and our x is shared within a KV group: so the test ties
our C heads within each group and repeats our x groups to the heads, after which the layers
compute the same function.
"""
from __future__ import annotations

import pytest
import torch

from linearize import mixers
from linearize.mixers import MixerConfig

HIDDEN, HEADS, HEAD_DIM, CHUNK = 32, 4, 8, 16


def ours(kv_heads, **options):
    torch.manual_seed(0)
    cfg = MixerConfig(HIDDEN, HEADS, kv_heads, HEAD_DIM, chunk_size=CHUNK, backend="torch",
                      options={"conv_init": "default", **options})
    m = mixers.build("mamba2", cfg).double()
    g = HEADS // kv_heads
    with torch.no_grad():
        for p in m.parameters():  # off the special initialisations (norm weight 1 ...)
            p.add_(0.2 * torch.randn_like(p))
        # one C per group: every head of a group takes its first head's q_proj rows and conv taps
        for h in range(HEADS):
            src = slice((h // g) * g * HEAD_DIM, ((h // g) * g + 1) * HEAD_DIM)
            dst = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            m.q_proj.weight[dst] = m.q_proj.weight[src]
            m.convs["q"].weight[dst] = m.convs["q"].weight[src]
    return m


def reference(m):
    """transformers' Mamba2Mixer holding ``m``'s weights."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    kv, g = m.num_kv_heads, HEADS // m.num_kv_heads
    cfg = Mamba2Config(hidden_size=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM, expand=1, n_groups=kv,
                       state_size=HEAD_DIM, conv_kernel=4, use_conv_bias=False, use_bias=False,
                       layer_norm_epsilon=m.eps, chunk_size=CHUNK, num_hidden_layers=1)
    ref = Mamba2Mixer(cfg, 0).double().eval()

    def by_head(w):  # [H_kv * P, ...] -> [H * P, ...]: group j's rows for each of its g heads
        return w.view(kv, HEAD_DIM, *w.shape[1:]).repeat_interleave(g, 0).flatten(0, 1)

    def per_group(w):  # [H * P, ...] (tied within groups) -> [H_kv * P, ...]
        return w.view(kv, g, HEAD_DIM, *w.shape[1:])[:, 0].flatten(0, 1)

    with torch.no_grad():
        ref.in_proj.weight.copy_(torch.cat([m.z_proj.weight, by_head(m.v_proj.weight), m.k_proj.weight,
                                            per_group(m.q_proj.weight), m.dt_proj.weight]))
        ref.conv1d.weight.copy_(torch.cat([by_head(m.convs["v"].weight), m.convs["k"].weight,
                                           per_group(m.convs["q"].weight)]))
        for name in ("dt_bias", "A_log", "D"):
            getattr(ref, name).copy_(getattr(m, name))
        ref.norm.weight.copy_(m.out_norm.weight)
        ref.out_proj.weight.copy_(m.o_proj.weight)
    return ref


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_mamba2_matches_transformers_mamba2_mixer(kv_heads):
    m = ours(kv_heads)
    ref = reference(m)
    x = torch.randn(2, 37, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
        got, _ = m(x, mode="chunk")
        got_rec, _ = m(x, mode="recurrent")
    # transformers' gated norm computes in float32 whatever the input: hence not 1e-12
    assert relative_error(got, expected) < 1e-6
    assert relative_error(got_rec, expected) < 1e-6


def test_one_norm_group_is_not_mamba2_when_there_are_several():
    """The fix is visible: normalising all channels together (norm_groups=1) departs from the
    reference when Mamba-2 has two groups."""
    m = ours(2, norm_groups=1)
    ref = reference(m)
    x = torch.randn(2, 37, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(m(x)[0], ref(x)) > 1e-2


def test_norm_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="norm_groups"):
        mixers.build("mamba2", MixerConfig(HIDDEN, HEADS, 2, HEAD_DIM, options={"norm_groups": 3}))
