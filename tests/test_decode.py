"""The decode path's fused single-token steps against the reference steps, in float64.

``*_step_fused`` (what the recurrent form and generation run) must compute exactly what the
plain ``*_step`` computes (the kernels' written-out recurrences, themselves checked against FLA's
naive code and float64 loops in test_kernels.py), from a non-trivial state, over several steps,
for every gate shape; and in float32 to float32 rounding of the float64 reference.
"""
from __future__ import annotations

import pytest
import torch

from linearize.kernels import delta, gated
from linearize.kernels.mlstm import mlstm_step, mlstm_step_fused  # kernels.mlstm is also a function

B, H, K, V, STEPS = 2, 3, 8, 5, 6


def close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs error {err:.3e}"


def _run(step, inputs, state):
    outs = []
    for t in range(STEPS):
        o, state = step(*(x[t] for x in inputs), state)
        outs.append(o)
    return torch.stack(outs), state


def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("gate", ["channel", "scalar", "none"])
def test_gla_step_fused_matches_reference(gate, dtype, tol):
    torch.manual_seed(0)
    q, k, v = _rand(STEPS, B, H, K), _rand(STEPS, B, H, K), _rand(STEPS, B, H, V)
    g = {"channel": -torch.rand(STEPS, B, H, K, dtype=torch.float64),
         "scalar": -torch.rand(STEPS, B, H, 1, dtype=torch.float64), "none": None}[gate]
    s0 = _rand(B, H, K, V)
    ref_o, ref_s = _run(gated.gla_step, [x.double() for x in (q, k, v)] + [[None] * STEPS if g is None else g], s0)
    cast = [x.to(dtype) for x in (q, k, v)] + [[None] * STEPS if g is None else g.to(dtype)]
    o, s = _run(gated.gla_step_fused, cast, s0.to(dtype))
    assert o.dtype == dtype and s.dtype == dtype
    close(o, ref_o, tol)
    close(s, ref_s, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_delta_step_fused_matches_reference(dtype, tol):
    torch.manual_seed(1)
    q = torch.nn.functional.normalize(_rand(STEPS, B, H, K), dim=-1)
    k = torch.nn.functional.normalize(_rand(STEPS, B, H, K), dim=-1)
    v, beta, s0 = _rand(STEPS, B, H, V), torch.rand(STEPS, B, H, dtype=torch.float64), _rand(B, H, K, V)
    ref_o, ref_s = _run(delta.delta_step, (q, k, v, beta), s0)
    o, s = _run(delta.delta_step_fused, [x.to(dtype) for x in (q, k, v, beta)], s0.to(dtype))
    assert o.dtype == dtype and s.dtype == dtype
    close(o, ref_o, tol)
    close(s, ref_s, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_mlstm_step_fused_matches_reference(dtype, tol):
    torch.manual_seed(2)
    q, k, v = _rand(STEPS, B, H, K), _rand(STEPS, B, H, K), _rand(STEPS, B, H, V)
    lf = torch.nn.functional.logsigmoid(_rand(STEPS, B, H))
    ig = 3 * _rand(STEPS, B, H)  # large input gates: the max-state stabiliser moves
    s0 = (_rand(B, H, K, V), _rand(B, H, K), _rand(B, H))
    ref_o, ref_s = _run(mlstm_step, (q, k, v, lf, ig), s0)
    o, s = _run(mlstm_step_fused, [x.to(dtype) for x in (q, k, v, lf, ig)], tuple(x.to(dtype) for x in s0))
    close(o, ref_o, tol)
    for a, b in zip(s, ref_s):
        close(a, b, tol)


def test_fused_steps_leave_the_given_state_untouched():
    """Generation may keep an old state (beam search, a user's copy): a step returns a new one."""
    s0 = _rand(B, H, K, V)
    keep = s0.clone()
    gated.gla_step_fused(_rand(B, H, K), _rand(B, H, K), _rand(B, H, V), -torch.rand(B, H, K, dtype=torch.float64), s0)
    gated.gla_step_fused(_rand(B, H, K), _rand(B, H, K), _rand(B, H, V), None, s0)
    delta.delta_step_fused(_rand(B, H, K), _rand(B, H, K), _rand(B, H, V), torch.rand(B, H, dtype=torch.float64), s0)
    c0 = (s0, _rand(B, H, K), _rand(B, H))
    keep_c = tuple(x.clone() for x in c0)
    mlstm_step_fused(_rand(B, H, K), _rand(B, H, K), _rand(B, H, V), _rand(B, H), _rand(B, H), c0)
    assert torch.equal(s0, keep)
    assert all(torch.equal(a, b) for a, b in zip(c0, keep_c))


# ---------------------------------------------------------------------------------------
# linearize.decode: the optional compiled layer step against the eager one
# ---------------------------------------------------------------------------------------
def _student(tiny_llama, name):
    import warnings

    from linearize.convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(tiny_llama, name, chunk_size=4).eval()


def _decode(student, prompt, steps):
    """Greedy decode by hand on a MixerCache: the prompt once (chunked form), then one token a step."""
    from linearize.modeling import MixerCache

    cache = MixerCache(len(student.model.layers))
    logits = [student(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        logits.append(student(input_ids=token, cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.slow  # inductor compiles a C++ kernel set: about a minute on 2 loaded cores
@pytest.mark.parametrize("name,scope,freeze", [("deltanet", "layer", False), ("gla", "layer", False),
                                               ("xlstm", "layer", False), ("deltanet", "model", False),
                                               ("gla", "model", True)])
def test_compiled_decode_equals_eager_decode(tiny_llama, name, scope, freeze):
    """The compiled step (one layer's, shared; or with scope="model" the stack of layers as one
    graph, with freeze its weights as constants) decodes what the eager model decodes, only the
    path asked for is installed, and uncompiling restores the eager path exactly."""
    from torch._dynamo.utils import counters

    from linearize.decode import compile_decode, uncompile_decode

    torch.manual_seed(3)
    student = _student(tiny_llama, name)
    prompt = torch.randint(0, tiny_llama.config.vocab_size, (2, 5))
    with torch.no_grad():
        eager = _decode(student, prompt, 4)
        graphs = counters["stats"]["unique_graphs"]
        compile_decode(student, scope=scope, freeze=freeze)
        per_layer = ["compiled_decode_step" in vars(layer) for layer in student.model.layers]
        assert per_layer == [scope == "layer"] * len(per_layer)
        assert ("compiled_decode_body" in vars(student.model)) == (scope == "model")
        try:
            compiled = _decode(student, prompt, 4)
        finally:
            uncompile_decode(student)
        again = _decode(student, prompt, 4)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled step ran
    # float32-level tolerance in a float64 model: Llama's RMSNorm computes in float32 (it upcasts
    # to float32 and casts back), and inductor keeps such float32 intermediates unrounded where
    # eager rounds them (emulate_precision_casts is off). A wrong state or step would be off by
    # orders of magnitude more (measured: 6e-8 absolute, logits of order 1).
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)  # uncompiled: the eager path again


def test_compile_decode_refuses_bad_options(tiny_llama):
    from linearize.decode import compile_decode

    student = _student(tiny_llama, "deltanet")
    with pytest.raises(ValueError, match="scope"):
        compile_decode(student, scope="stack")
    with pytest.raises(ValueError, match="freeze=True needs scope='model'"):
        compile_decode(student, freeze=True)


def test_compile_decode_refuses_the_teacher(tiny_llama):
    from linearize.decode import compile_decode

    with pytest.raises(TypeError, match="LinearizedLlamaForCausalLM"):
        compile_decode(tiny_llama)
