"""A new mixer is one module plus one registration: a toy 11th mixer, defined here and nowhere
else, converts from a teacher, resolves its parameters, trains and generates.

The toy is linear attention with the elu+1 feature map (Katharopoulos et al. 2020), rows
normalised: a mixer the project does not ship. It is registered for the tests of this module
only (the fixture removes it again), so the rest of the suite keeps the ten shipped mixers.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from linearize import mixers
from linearize import params as P
from linearize import stages as S
from linearize import runs as RF
from linearize.convert import convert
from linearize.mixers.linear import Features, KernelFamily, LinearMixer, kernel_family

SEQ = 16


class ToyLinearAttention(LinearMixer):
    name = "toy"
    paper = "Linear attention, elu+1 features (Katharopoulos et al. 2020)"
    decay = "none"
    normalize = True
    matrix_note = "A_ij = phi(q_i).phi(k_j) / sum_l<=i phi(q_i).phi(k_l), phi = elu + 1."

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.llama_projections()

    def features(self, x, position_embeddings, state, new_state):
        phi = lambda t: F.elu(t) + 1  # noqa: E731
        q = phi(self.heads(self.q_proj(x)))
        k = phi(self.heads(self.k_proj(x), kv=True))
        return Features(q=q, k=k, v=self.heads(self.v_proj(x), kv=True))


@pytest.fixture
def toy():
    mixers.register(ToyLinearAttention)
    yield "toy"
    mixers.unregister("toy")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def test_the_toy_is_registered_only_inside_the_fixture(toy):
    assert mixers.available()[-1] == "toy" and mixers.get("toy") is ToyLinearAttention
    assert mixers.spec("toy").family == "gated" and mixers.spec("toy").paper.startswith("Linear attention")


def test_the_toy_is_gone_after_the_fixture():
    assert "toy" not in mixers.available()


def test_registration_refuses_a_taken_name_and_a_bad_class():
    class Impostor(ToyLinearAttention):
        name = "gla"

    with pytest.raises(ValueError, match="taken by linearize.mixers.gla.GLA"):
        mixers.register(Impostor)
    with pytest.raises(TypeError, match="TokenMixer subclass"):
        mixers.register(dict)

    class Nameless(ToyLinearAttention):
        pass

    with pytest.raises(ValueError, match="must set its own `name`"):
        mixers.register(Nameless)


def test_the_toys_three_forms_agree(toy):
    cfg = mixers.MixerConfig(32, 4, 2, 8, chunk_size=16, backend="torch")
    torch.manual_seed(0)
    m = mixers.build(toy, cfg).double()
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    chunk, rec, a = m.core(x, mode="chunk"), m.core(x, mode="recurrent"), m.mixing_matrix(x)
    torch.testing.assert_close(rec.o, chunk.o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a @ chunk.v, chunk.o, rtol=1e-10, atol=1e-10)
    # the reference: the normalised kernel written out with the elu+1 features
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    q, k = phi(m.heads(m.q_proj(x))), phi(m.heads(m.k_proj(x), kv=True))
    scores = (q @ k.transpose(-1, -2)).tril()
    torch.testing.assert_close(a, scores / (scores.sum(-1, keepdim=True) + m.eps), rtol=1e-10, atol=1e-12)


def test_the_toy_converts_trains_and_generates(toy, teacher, tmp_path):
    # parameters: no entry in params/students.yaml is needed
    params = P.resolve(toy, overrides=dict(seq_len=SEQ, batch_size=4, stage1_tokens=4 * SEQ * 2,
                                           stage3_tokens=4 * SEQ * 2, run_name="t", qkv_copy=True,
                                           checkpoint_every=1))
    assert params["arch"] == toy

    # conversion: the teacher's projections are copied into the toy's Llama-named ones
    student = convert(teacher, toy, qkv_copy=True)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(student.model.layers[1].self_attn, proj).weight,
                           getattr(teacher.model.layers[1].self_attn, proj).weight)

    # training: stage 1 (its mixing matrix against the teacher's attention) and stage 3
    blocks = torch.randint(0, 96, (8, SEQ), generator=torch.Generator().manual_seed(1))
    run = RF.Run(params, root=tmp_path)
    for stage in (1, 3):
        student, start = RF.load_student(run, teacher, params, stage)
        before = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
        res = S.train_stage(stage, student, teacher, blocks, params, run, start=start, progress=False)
        assert res.finished and res.steps == 2
        losses = [m["loss"] for m in run.metrics() if m.get("event") == "step" and m["stage"] == stage]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        assert not torch.equal(res.student.model.layers[0].self_attn.q_proj.weight, before)
    assert (tmp_path / toy / "t" / "stage3" / "done.json").exists()

    # generation on the recurrent state equals greedy decoding by full forwards
    student = res.student.eval()
    prompt = blocks[:1, :5]
    with torch.no_grad():
        out = student.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, student(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


class PlainLinearFamily(KernelFamily):
    """A kernel family written in the test: causal linear attention without decay or normaliser,
    its chunked form as the masked quadratic product and its recurrent form as a running sum."""

    name = "plain"

    def run(self, mixer, f, mode, state):
        s = self.init_state(mixer, f.q.shape[0], f.q.device, f.q.dtype)["S"] if state is None else state["S"]
        if mode == "chunk":
            o = self.matrix(mixer, f) @ f.v + f.q @ s
            s = s + f.k.transpose(-1, -2) @ f.v
        else:
            outs = []
            for t in range(f.q.shape[2]):
                s = s + f.k[:, :, t, :, None] * f.v[:, :, t, None, :]
                outs.append((f.q[:, :, t, None] @ s).squeeze(2))
            o = torch.stack(outs, 2)
        return o, {"S": s}

    def matrix(self, mixer, f):
        return (f.q @ f.k.transpose(-1, -2)).tril()

    def init_state(self, mixer, batch_size, device, dtype):
        return {"S": torch.zeros(batch_size, mixer.num_heads, mixer.key_dim, mixer.head_dim, device=device, dtype=dtype)}


def test_a_kernel_family_is_an_object_a_mixer_can_bring():
    class Plain(ToyLinearAttention):
        name = "plain"
        family = PlainLinearFamily()
        normalize = False

    mixers.register(Plain)
    try:
        assert mixers.spec("plain").family == "plain"
        torch.manual_seed(0)
        m = mixers.build("plain", mixers.MixerConfig(32, 4, 2, 8, chunk_size=16, backend="torch")).double()
        x = torch.randn(2, 21, 32, dtype=torch.float64)
        torch.testing.assert_close(m.core(x, mode="recurrent").o, m.core(x).o, rtol=1e-10, atol=1e-10)
        # the generation state carries over: a prefix, then steps, equals one pass
        y, _ = m(x)
        y0, s = m(x[:, :9], mode="chunk")
        y1, _ = m(x[:, 9:], state=s, mode="recurrent")
        torch.testing.assert_close(torch.cat([y0, y1], 1), y, rtol=1e-10, atol=1e-10)
    finally:
        mixers.unregister("plain")
    with pytest.raises(ValueError, match="unknown kernel family 'nope'"):
        kernel_family("nope")
