"""The closed-form readout fit (linearize.calibrate) against independent references."""
import pytest
import torch

from linearize.calibrate import fit_readouts
from linearize.convert import convert
from linearize.teacher import rotary


def _layer0_pairs(teacher, student, ids):
    """Z (student o_proj input) and Y (teacher attention output) of layer 0, computed directly
    with the teacher's own attention module rather than through iter_layers and moments."""
    hidden = teacher.model.embed_tokens(ids)
    pe = rotary(teacher, hidden)
    t = ids.shape[1]
    causal = torch.full((t, t), float("-inf"), dtype=hidden.dtype).triu(1)[None, None]
    x = teacher.model.layers[0].input_layernorm(hidden)
    y = teacher.model.layers[0].self_attn(hidden_states=x, position_embeddings=pe, attention_mask=causal)[0]
    box = {}
    mixer = student.model.layers[0].self_attn
    h = mixer.o_proj.register_forward_pre_hook(lambda _m, inp: box.__setitem__("z", inp[0]))
    mixer(x, position_embeddings=pe)
    h.remove()
    return box["z"].reshape(-1, box["z"].shape[-1]), y.reshape(-1, y.shape[-1])


@torch.no_grad()
def test_fit_matches_ridge_least_squares_reference(tiny_llama):
    """The fitted o_proj equals the ridge solution from torch.linalg.lstsq on the stacked,
    augmented system [Z; sqrt(lam s) I] W^T = [Y; sqrt(lam s) W0^T], and the reported error
    equals the directly computed one."""
    torch.manual_seed(1)
    student = convert(tiny_llama, "gla", qkv_copy=True)
    ids = torch.randint(0, 97, (6, 24))
    z, y = _layer0_pairs(tiny_llama, student, ids)
    w0 = student.model.layers[0].self_attn.o_proj.weight.clone()
    ridge = 1e-2
    report = fit_readouts(student, tiny_llama, ids, ridge=ridge, batch_size=4)
    s = (z * z).sum(0).mean()
    f = z.shape[1]
    a = torch.cat([z, (ridge * s).sqrt() * torch.eye(f, dtype=z.dtype)])
    b = torch.cat([y, (ridge * s).sqrt() * w0.T])
    expect = torch.linalg.lstsq(a, b).solution.T
    got = student.model.layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(got, expect, rtol=1e-7, atol=1e-9)
    direct = ((z @ got.T - y) ** 2).sum() / (y ** 2).sum()
    assert report[0].rel_error_after == pytest.approx(float(direct), rel=1e-6)
    before = ((z @ w0.T - y) ** 2).sum() / (y ** 2).sum()
    assert report[0].rel_error_before == pytest.approx(float(before), rel=1e-6)
    assert report[0].tokens == ids.numel()
    assert all(r.rel_error_after <= r.rel_error_before for r in report)


@torch.no_grad()
def test_fit_recovers_the_teachers_output_projection(tiny_llama):
    """Softmax student with copied Q/K/V and a scrambled o_proj: its o_proj input is exactly the
    teacher's, so the least-squares readout is the teacher's o_proj."""
    student = convert(tiny_llama, "softmax", qkv_copy=True)
    torch.manual_seed(2)
    for layer in student.model.layers:
        layer.self_attn.o_proj.weight.normal_()
    ids = torch.randint(0, 97, (16, 32))
    report = fit_readouts(student, tiny_llama, ids, ridge=1e-12)
    for s_layer, t_layer, r in zip(student.model.layers, tiny_llama.model.layers, report):
        torch.testing.assert_close(s_layer.self_attn.o_proj.weight, t_layer.self_attn.o_proj.weight,
                                   rtol=0, atol=1e-5)  # weights ~0.02
        assert r.rel_error_before > 0.5 and r.rel_error_after < 1e-10


@torch.no_grad()
def test_fit_lowers_held_out_layer_error(tiny_llama):
    """Fitted on some sequences, the DeltaNet student's layer-0 attention output is closer to
    the teacher's on other sequences too."""
    student = convert(tiny_llama, "deltanet", qkv_copy=True)
    torch.manual_seed(3)
    train, held = torch.randint(0, 97, (16, 32)), torch.randint(0, 97, (4, 32))

    def err():
        z, y = _layer0_pairs(tiny_llama, student, held)
        return float(((student.model.layers[0].self_attn.o_proj(z) - y) ** 2).sum() / (y ** 2).sum())

    before = err()
    fit_readouts(student, tiny_llama, train)
    assert err() < 0.8 * before


def test_fit_rejects_bad_input(tiny_llama):
    student = convert(tiny_llama, "gla", qkv_copy=True)
    ids = torch.randint(0, 97, (2, 8))
    with pytest.raises(ValueError, match="ridge must be > 0"):
        fit_readouts(student, tiny_llama, ids, ridge=0)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        fit_readouts(student, tiny_llama, ids[0])
