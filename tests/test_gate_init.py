"""Decay gates from the teacher (linearize.gate_init): the geometric mean by hand, the fit
recovers a known retention, the teacher's distances against transformers' own attention maps,
and every gated mixer's forward then decays at the fitted rate."""
import pytest
import torch

from linearize import gate_init as G
from linearize import params as P
from linearize import runs as RF


def test_geometric_mean_distance_by_hand():
    # gamma 1/2 over d = 0, 1: weights 1, 1/2 -> mean (1/2) / (3/2) = 1/3;
    # over d = 0, 1, 2: weights 1, 1/2, 1/4 -> (1/2 + 1/2) / (7/4) = 4/7
    got = G.geometric_mean_distance(torch.tensor(0.5), torch.tensor([2, 3]))
    assert got.tolist() == pytest.approx([1 / 3, 4 / 7], rel=1e-12)


def test_fit_recovers_a_known_retention():
    # Attention rows built by hand from gamma^(i-j) over keys 1..i (key 0 is the sink and is
    # skipped), with all the mass of row i's sink put on key 0 to check it is really ignored.
    t, gammas = 40, [0.3, 0.8, 0.97]
    m = torch.zeros(len(gammas), t, dtype=torch.float64)
    for h, g in enumerate(gammas):
        for i in range(t):
            keys = range(1, i + 1)
            w = [g ** (i - j) for j in keys]
            if w:
                m[h, i] = sum(wi * (i - j) for wi, j in zip(w, keys)) / sum(w)
    assert G.fit_retention(m).tolist() == pytest.approx(gammas, abs=1e-6)


def test_teacher_distances_match_transformers_attention(tiny_llama):
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    m, _ = G.teacher_mean_distance(tiny_llama, ids, batch_size=2)
    out = tiny_llama(input_ids=ids, output_attentions=True)
    t = ids.shape[1]
    for layer, att in enumerate(out.attentions):  # [B, H, T, T]
        a = att.double()[..., 1:]
        a = a / a.sum(-1, keepdim=True)
        i = torch.arange(t, dtype=torch.float64).view(-1, 1)
        j = torch.arange(1, t, dtype=torch.float64).view(1, -1)
        ref = (a * (i - j).clamp_min(0)).sum(-1).mean(0)
        # row 0 has no key after the sink: both give 0 there (0/0 guarded), compare the rest
        assert torch.allclose(m[layer, :, 1:], ref[:, 1:], atol=1e-9)


@pytest.mark.parametrize("arch", ["gla", "metala", "hgrn2", "xlstm", "mamba2"])
def test_gated_mixers_decay_at_the_fitted_rate(arch, tiny_llama):
    params = P.resolve(arch, overrides={"qkv_copy": True, "seq_len": 16})
    student = RF.convert_student(tiny_llama.float(), params).double()
    n_layers, h = len(student.model.layers), student.model.layers[0].self_attn.config.num_heads
    gammas = torch.linspace(0.5, 0.99, n_layers * h, dtype=torch.float64).view(n_layers, h)
    changed = G.init_gates(student, gammas)
    assert len(changed) == n_layers
    for layer, g in zip(student.model.layers, gammas):
        mixer = layer.self_attn
        assert G.decay_of(mixer) == pytest.approx(g.tolist(), rel=1e-9)
        # reference through the mixer's own forward: with the data-dependent part of every gate
        # zeroed, the log decay it feeds the kernel is log gamma per head
        with torch.no_grad():
            for name, p in mixer.named_parameters():
                if name.endswith("weight") and any(k in name for k in ("gk_proj", "f_proj", "fgate", "dt_proj")):
                    p.zero_()
        x = torch.randn(1, 5, mixer.config.hidden_size, dtype=torch.float64)
        pe = tiny_llama.model.rotary_emb(x, torch.arange(5)[None])
        with torch.no_grad():
            f = mixer.features(x, pe, None, {})
        log_decay = f.lf if arch == "xlstm" else f.g
        per_head = log_decay.reshape(1, h, 5, -1).mean(-1)[0, :, 0].exp()
        assert per_head.tolist() == pytest.approx(g.tolist(), rel=1e-6)
    tiny_llama.double()


def test_decay_free_mixers_are_left_alone(tiny_llama):
    params = P.resolve("deltanet", overrides={"qkv_copy": True, "seq_len": 16})
    student = RF.convert_student(tiny_llama.float(), params)
    tiny_llama.double()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert G.init_gates(student, torch.full((2, 4), 0.9)) == []
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
