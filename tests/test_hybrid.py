"""The hybrid option (beyond the paper): a softmax window + sinks beside every student's linear
branch. Checked against a float64 reference written here (an explicit loop over positions and
keys), against the mixer with the window switched off, and against the teacher itself."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from linearize import mixers
from linearize.convert import convert
from linearize.mixers import MixerConfig
from linearize.mixers import hybrid as H
from linearize.modeling import MixerCache, generation_state_bytes

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, CHUNK = 32, 4, 2, 8, 16
LINEAR = [n for n in mixers.available() if n != "softmax"]
VALUE_CONV = {"deltanet", "mamba2", "metala"}  # the linear branch's values pass a convolution


def make(name, window=5, sinks=2, mix=0.7, learn=True, seed=0, hybrid=True):
    torch.manual_seed(seed)
    options = {"hybrid_window": window, "hybrid_sinks": sinks, "hybrid_mix": mix,
               "hybrid_learn_mix": learn} if hybrid else {}
    cfg = MixerConfig(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, chunk_size=CHUNK, backend="torch", options=options)
    m = mixers.build(name, cfg).double()
    with torch.no_grad():  # off every special init, the gate included (a different g per head)
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def rope(t, start=0, batch=2, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    ang = torch.arange(start, start + t, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)[None].expand(batch, -1, -1)
    return emb.cos(), emb.sin()


def close(a, b, tol=1e-9):
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3e} (scale {scale:.3e})"


# ---------------------------------------------------------------------------------------
# the float64 reference: one query, one key at a time
# ---------------------------------------------------------------------------------------
def _rot(x, cos, sin):  # x [D] at one position, the rotate-half RoPE of Llama
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[half:], x[:half]]) * sin


def reference_window(m, x, cos, sin, window, sinks):
    """(o [B, H, T, D], P [B, H, T, T]): per query i, softmax over keys j <= i with
    j > i - window or j < sinks, keys/values from the teacher-shaped projections."""
    proj = {n: (getattr(m.hybrid, n) if n in m.hybrid.own else getattr(m, n)).weight for n in ("q_proj", "k_proj", "v_proj")}
    b, t, _ = x.shape
    group = HEADS // KV_HEADS
    o = torch.zeros(b, HEADS, t, HEAD_DIM, dtype=torch.float64)
    p_all = torch.zeros(b, HEADS, t, t, dtype=torch.float64)
    for bi in range(b):
        for h in range(HEADS):
            kv = h // group
            wq = proj["q_proj"][h * HEAD_DIM:(h + 1) * HEAD_DIM]
            wk = proj["k_proj"][kv * HEAD_DIM:(kv + 1) * HEAD_DIM]
            wv = proj["v_proj"][kv * HEAD_DIM:(kv + 1) * HEAD_DIM]
            for i in range(t):
                q = _rot(wq @ x[bi, i], cos[bi, i], sin[bi, i])
                seen = [j for j in range(i + 1) if j > i - window or j < sinks]
                scores = torch.stack([q @ _rot(wk @ x[bi, j], cos[bi, j], sin[bi, j]) for j in seen]) / math.sqrt(HEAD_DIM)
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                for wj, j in zip(weights, seen):
                    p_all[bi, h, i, j] = wj
                    o[bi, h, i] += wj * (wv @ x[bi, j])
    return o, p_all


def pre_o_proj(name, m, x, pe):
    """The same mixer with the window off, o_proj taken out: its output() up to o_proj."""
    plain = make(name, hybrid=False)
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(k.startswith("hybrid.") for k in unexpected)
    w_o = plain.o_proj.weight.detach().clone()
    plain.o_proj = torch.nn.Identity()
    with torch.no_grad():
        return plain(x, pe, mode="chunk")[0], w_o


# ---------------------------------------------------------------------------------------
# three forms against the reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 6, 23])
@pytest.mark.parametrize("name", ["gla", "deltanet", "xlstm", "mamba2", "hgrn2"])
def test_window_branch_equals_reference_in_every_form(name, t):
    m = make(name)
    x = torch.randn(2, t, HIDDEN, dtype=torch.float64)
    pe = rope(t)
    o_ref, p_ref = reference_window(m, x, *pe, window=5, sinks=2)
    with torch.no_grad():
        chunk = m.hybrid.parts(m, x, pe, mode="chunk")
        rec = m.hybrid.parts(m, x, pe, mode="recurrent")
    close(chunk["o_window"], o_ref)
    close(rec["o_window"], o_ref)
    close(chunk["a_window"], p_ref)
    close(chunk["a_window"] @ chunk["v_window"], o_ref)
    # the linear branch is the plain mixer's
    plain = make(name, hybrid=False)
    plain.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        close(chunk["o_linear"], plain.core(x, pe).o)
        close(chunk["a_linear"], plain.mixing_matrix(x, pe))


@pytest.mark.parametrize("name", LINEAR)
def test_chunk_recurrent_and_matrix_agree(name):
    t = 40  # > window + sinks and > 2 chunks: the ring wraps, the blocks cut the window
    m = make(name)
    x = torch.randn(2, t, HIDDEN, dtype=torch.float64)
    pe = rope(t)
    with torch.no_grad():
        chunk, rec = m.core(x, pe, mode="chunk"), m.core(x, pe, mode="recurrent")
        a = m.mixing_matrix(x, pe)
        parts = m.hybrid.parts(m, x, pe)
    close(chunk.o, rec.o)
    assert torch.all(a.triu(1) == 0), "the hybrid's mixing matrix must stay causal"
    g = torch.sigmoid(m.hybrid.mix_logit.detach()).view(1, -1, 1, 1)
    assert g.flatten().std() > 0  # a different gate per head is exercised
    _, p_ref = reference_window(m, x[:1], *rope(t, batch=1), window=5, sinks=2)
    close(a[:1], (1 - g) * parts["a_linear"][:1] + g * p_ref)
    close(parts["a_linear"] @ parts["v_linear"], parts["o_linear"])
    if name not in VALUE_CONV:  # both branches read the same values: the whole map gives o
        close(a @ chunk.v, chunk.o)


@pytest.mark.parametrize("name", LINEAR)
def test_forward_mixes_before_o_proj_as_the_reference(name):
    t = 19
    m = make(name)
    x = torch.randn(2, t, HIDDEN, dtype=torch.float64)
    pe = rope(t)
    o_win, _ = reference_window(m, x, *pe, window=5, sinks=2)
    pre, w_o = pre_o_proj(name, m, x, pe)
    g = torch.sigmoid(m.hybrid.mix_logit.detach())
    mixed = torch.zeros_like(pre)
    for h in range(HEADS):
        sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        mixed[..., sl] = g[h] * o_win[:, h] + (1 - g[h]) * pre[..., sl]
    with torch.no_grad():
        y, _ = m(x, pe, mode="chunk")
        y_rec, _ = m(x, pe, state=m.init_state(2, x.device, x.dtype))
    close(y, mixed @ w_o.T)
    # token by token from the empty state (the decode path) gives the same
    ys, s = [], m.init_state(2, x.device, x.dtype)
    with torch.no_grad():
        for i in range(t):
            y_i, s = m(x[:, i:i + 1], tuple(p[:, i:i + 1] for p in pe), state=s, mode="recurrent")
            ys.append(y_i)
    close(torch.cat(ys, 1), y)
    close(y_rec, y)


# ---------------------------------------------------------------------------------------
# prompt state, continuation, constant memory
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuts", [(1, 3), (2, 9), (20, 24), (7, 30)])
@pytest.mark.parametrize("name", ["gla", "deltanet", "xlstm", "mamba2", "metala"])
def test_prefill_continuation_then_decode_equals_full_forward(name, cuts):
    """chunk [0, a) from nothing, chunk [a, b) from that state, then single steps: one parallel pass.
    The cuts put the state before, inside and after the sinks, before and after the ring wraps."""
    t, (a, b) = 37, cuts
    m = make(name, seed=1)
    x = torch.randn(2, t, HIDDEN, dtype=torch.float64)
    cos, sin = rope(t)
    pe = lambda i, j: (cos[:, i:j], sin[:, i:j])  # noqa: E731
    with torch.no_grad():
        y_full, s_full = m(x, (cos, sin), mode="chunk")
        y0, s = m(x[:, :a], pe(0, a), state=m.init_state(2, x.device, x.dtype), mode="chunk")
        y1, s = m(x[:, a:b], pe(a, b), state=s, mode="chunk")
        ys = [y0, y1]
        for i in range(b, t):
            y_i, s = m(x[:, i:i + 1], pe(i, i + 1), state=s)
            ys.append(y_i)
    close(torch.cat(ys, 1), y_full)
    assert s.keys() == s_full.keys() and set(H.STATE_KEYS) <= set(s)
    for key in s:
        close(s[key].double(), s_full[key].double())


def test_state_is_constant_size_and_counted(tiny_llama):
    student = convert(tiny_llama, "gla", mixer_options={"hybrid_window": 8, "hybrid_sinks": 2}).double()
    plain = convert(tiny_llama, "gla")
    sizes = [generation_state_bytes(student, 2, n) for n in (4, 64, 200)]
    assert sizes[0] == sizes[1] == sizes[2]
    with torch.no_grad():
        measured = student(torch.ones(2, 64, dtype=torch.long), use_cache=True).cache.nbytes()
    assert measured == sizes[1]
    cfg = tiny_llama.config
    window = 2 * cfg.num_key_value_heads * (8 + 2) * cfg.head_dim * 8 + 8  # K, V of w + s tokens + the count
    extra = cfg.num_hidden_layers * 2 * window  # batch 2
    plain_bytes = generation_state_bytes(plain.double(), 2, 64)
    assert measured == plain_bytes + extra


# ---------------------------------------------------------------------------------------
# converted students: the teacher exactly, generation, the scorer's cache handling
# ---------------------------------------------------------------------------------------
def sdpa_teacher():
    """A tiny float64 Llama on sdpa: its softmax stays in float64 (the conftest's eager one
    rounds the attention weights to float32, 2e-7 off any float64 attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("name", ["gla", "deltanet", "xlstm", "mamba2", "hgrn2"])
def test_window_only_hybrid_reproduces_the_teacher(name):
    """window >= T, the mix fixed fully on the window: every layer is the teacher's attention."""
    tiny_llama = sdpa_teacher()
    ids = torch.randint(1, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    opts = {"hybrid_window": 32, "hybrid_sinks": 3, "hybrid_mix": 1.0, "hybrid_learn_mix": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = convert(tiny_llama, name, mixer_options=opts, chunk_size=8)
        # a window shorter than the sequence is no longer the teacher
        short = convert(tiny_llama, name, mixer_options={**opts, "hybrid_window": 4}, chunk_size=8)
    with torch.no_grad():
        expected = tiny_llama(ids).logits
        got = student(ids).logits
        got_short = short(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert (got_short - expected).abs().max() > 1e-4
    # and with a learned gate at 0.5 the linear branch shows
    half = convert(tiny_llama, name, mixer_options={"hybrid_window": 32, "hybrid_mix": 0.5}, chunk_size=8)
    with torch.no_grad():
        assert (half(ids).logits - expected).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["deltanet", "hgrn2"])
def test_generate_with_the_cache_equals_teacher_forcing(tiny_llama, name):
    student = convert(tiny_llama, name, mixer_options={"hybrid_window": 4, "hybrid_sinks": 1}, chunk_size=4)
    prompt = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
        forced = student(out.sequences[:, :-1]).logits[:, 6:]
    assert isinstance(out.cache, MixerCache)
    torch.testing.assert_close(torch.stack(out.logits, 1), forced.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.sequences[:, 7:], forced.argmax(-1))
    # the cache survives batch selection (the scorer expands one context's cache to its choices)
    with torch.no_grad():
        step = student(prompt, use_cache=True)
        step.cache.batch_select_indices(torch.tensor([1, 1, 0]))
        nxt = torch.tensor([[5], [6], [7]])
        got = student(nxt, cache=step.cache).logits[:, -1]
        want = student(torch.cat([prompt[[1, 1, 0]], nxt], 1)).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_shared_context_scorer_takes_a_hybrid(tiny_llama, teacher):
    from lm_eval.models.huggingface import HFLM

    from linearize.scoring import SharedContextLM

    _, tok = teacher
    model = convert(tiny_llama, "gla", mixer_options={"hybrid_window": 4, "hybrid_sinks": 1}).double().eval()
    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    reqs = []
    for ctx_len in (7, 7, 7, 7, 12, 12, 12, 12):
        ctx = rand(ctx_len)
        reqs += [(("c", "x"), ctx, rand(n)) for n in (1, 3, 5)]
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")._loglikelihood_tokens(reqs, True)
    ours = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")._loglikelihood_tokens(reqs, True)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], rel=1e-6, abs=1e-6)


def test_save_load_keeps_the_hybrid(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    student = convert(tiny_llama, "hgrn2", mixer_options={"hybrid_window": 6}, chunk_size=4)
    assert student.mixers[0].hybrid is not None and student.mixers[0].hybrid.own == ("k_proj",)
    # the window-only key projection is the teacher's
    torch.testing.assert_close(student.mixers[1].hybrid.k_proj.weight, tiny_llama.model.layers[1].self_attn.k_proj.weight)
    notes = [n for _, n in student.conversion_notes if "hybrid window" in n]
    assert notes and all("beyond the paper" in n for n in notes)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    ids = torch.randint(1, 97, (1, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# options, names, refusals
# ---------------------------------------------------------------------------------------
def test_options_and_names():
    assert H.settings({}) is None and H.settings({"hybrid_window": 0, "hybrid_sinks": 9}) is None
    st = H.settings({"hybrid_window": 64})
    assert (st.window, st.sinks, st.mix, st.learn_mix) == (64, H.DEFAULT_SINKS, H.DEFAULT_MIX, True)
    assert H.parse_name("deltanet+w64") == ("deltanet", {"hybrid_window": 64})
    assert H.parse_name("gla+w16s0") == ("gla", {"hybrid_window": 16, "hybrid_sinks": 0})
    assert H.parse_name("gla") == ("gla", {})
    assert H.format_name("gla", {"hybrid_window": 16, "hybrid_sinks": 0}) == "gla+w16s0"
    assert H.format_name("gla", {"hybrid_window": 16}) == "gla+w16"
    for bad in ("gla+64", "gla+w0", "gla+w8x"):
        with pytest.raises(ValueError, match="deltanet\\+w64"):
            H.parse_name(bad)
    with pytest.raises(ValueError, match="strictly between"):
        H.settings({"hybrid_window": 8, "hybrid_mix": 1.0})
    with pytest.raises(ValueError, match="whole number"):
        H.settings({"hybrid_window": -1})
    assert H.is_hybrid({"hybrid_window": 8}) and H.is_hybrid({"mixer_options": {"hybrid_window": 8}})
    assert not H.is_hybrid({"hybrid_window": 0, "mixer_options": {}})


def test_softmax_student_refuses_a_window():
    cfg = MixerConfig(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, options={"hybrid_window": 8})
    with pytest.raises(ValueError, match="exact already"):
        mixers.build("softmax", cfg)


def test_fixed_mix_is_a_buffer_and_learned_mix_trains():
    fixed = make("gla", mix=0.25, learn=False)
    assert "hybrid.mix_logit" in dict(fixed.named_buffers())
    assert "hybrid.mix_logit" not in dict(fixed.named_parameters())
    learned = make("gla", mix=0.25)
    x = torch.randn(1, 9, HIDDEN, dtype=torch.float64)
    learned(x, rope(9, batch=1))[0].square().mean().backward()
    assert learned.hybrid.mix_logit.grad.abs().min() > 0


# ---------------------------------------------------------------------------------------
# params, stage identity, runner, study, bench
# ---------------------------------------------------------------------------------------
def test_params_fill_mixer_options_and_old_identities_still_match():
    from linearize import params as P
    from linearize.stages import stage_identity

    off = P.resolve("gla", "cpu-quick")
    assert off["hybrid_window"] == 0 and not any(k.startswith("hybrid") for k in off["mixer_options"])
    ident = stage_identity(off, 3, "conversion")
    assert not any(k.startswith("hybrid") for k in ident)  # a run folder from before the hybrid matches
    on = P.resolve("gla", "cpu-quick", {"hybrid_window": 64, "hybrid_sinks": 2})
    assert on["mixer_options"] == {"hybrid_window": 64, "hybrid_sinks": 2, "hybrid_mix": H.DEFAULT_MIX}
    ident_on = stage_identity(on, 3, "conversion")
    assert ident_on["hybrid_window"] == 64 and ident_on["hybrid_sinks"] == 2
    with pytest.raises(P.ParamsError, match="use the keys hybrid_window"):
        P.resolve("gla", "cpu-quick", {"mixer_options": {"hybrid_window": 8}})
    with pytest.raises(P.ParamsError, match="strictly between"):
        P.resolve("gla", "cpu-quick", {"hybrid_window": 8, "hybrid_mix": 0.0})
    with pytest.raises(P.ParamsError, match="exact attention already"):
        P.resolve("softmax", "cpu-quick", {"hybrid_window": 8})
    # the window alone (the control of benchmarks/recipe.py's window-w64): a fixed mix of 1, and a
    # stage identity that differs from the learned hybrid's
    alone = P.resolve("gla", "cpu-quick", {"hybrid_window": 64, "hybrid_sinks": 2, "hybrid_mix": 1.0,
                                           "hybrid_learn_mix": False})
    assert alone["mixer_options"] == {"hybrid_window": 64, "hybrid_sinks": 2, "hybrid_mix": 1.0,
                                      "hybrid_learn_mix": False}
    assert H.settings(alone["mixer_options"]).learn_mix is False
    assert stage_identity(alone, 3, "conversion") != stage_identity(
        P.resolve("gla", "cpu-quick", {"hybrid_window": 64, "hybrid_sinks": 2, "hybrid_mix": 0.5}), 3, "conversion")
    with pytest.raises(P.ParamsError, match="hybrid_learn_mix must be true or false"):
        P.resolve("gla", "cpu-quick", {"hybrid_window": 8, "hybrid_learn_mix": "maybe"})


def test_runner_plans_hybrid_runs_and_the_study_labels_them(tmp_path):
    from linearize import runner, study

    steps = runner.plan(["gla", "softmax"], "cpu-quick", grid="paper", hybrid_windows=(0, 64))
    aligns = [s for s in steps if s.notebook == "01_align.ipynb"]
    assert [str(s.output.parent.relative_to(s.output.parents[2])) for s in aligns] == [
        "gla/cpu-quick-qkv-mm-h2h", "gla/cpu-quick-qkv-mm-h2h-w64", "softmax/cpu-quick-qkv-mm-h2h"]
    assert aligns[1].parameters["overrides"] == {"hybrid_window": 64}
    assert "overrides" not in aligns[0].parameters
    bench = [s for s in steps if s.notebook == "04_benchmark.ipynb"]
    if bench:
        assert bench[0].parameters["models"] == "teacher,gla,softmax,gla+w64"
    # the study reads the variant from the parameters a run stored
    from linearize import params as P

    stored = P.resolve("gla", "cpu-quick", {"hybrid_window": 64})
    assert study.variant_of(stored) == "qkv-mm-h2h-w64"
    assert study.variant_of(aligns[1].parameters) == "qkv-mm-h2h-w64"
    assert study.variant_of(P.resolve("gla", "cpu-quick")) == "qkv-mm-h2h"
    assert study.variant_suffix("qkv-mm-h2h-w64") == " + QKV + MM + H2H + window 64 (hybrid, beyond the paper)"
    assert study.variant_suffix("qkv-mm-h2h") == " + QKV + MM + H2H"
    import yaml

    for name, extra in (("cpu-quick-qkv-mm-h2h-w64", {"hybrid_window": 64}), ("cpu-quick-qkv-mm-h2h", {})):
        folder = tmp_path / "gla" / name
        folder.mkdir(parents=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(P.resolve("gla", "cpu-quick", extra)))
    runs = study.find_runs(tmp_path)
    assert {r.dir.name: r.hybrid for r in runs} == {"cpu-quick-qkv-mm-h2h-w64": True, "cpu-quick-qkv-mm-h2h": False}
    assert list(study.runs_frame(runs)["hybrid"]) == [r.hybrid for r in runs]
    table = study.table_hybrid(runs)
    assert any("beyond the paper" in label for label in table.index)
    # the paper's table shows the plain run only, never the hybrid under the paper's label
    assert list(study.table3(runs)["run"].loc[lambda c: c != "-"]) == ["gla/cpu-quick-qkv-mm-h2h"]


def test_bench_measures_a_hybrid_like_every_student(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from linearize import bench

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "teacher")
    rows = bench.run(["deltanet", "deltanet+w8"], [16, 32], teacher=str(tmp_path / "teacher"), threads=1, steps=2,
                     prefill_chunk=8, bandwidth_mib=16, isolate=False, log=lambda *_: None)
    assert not any(r["error"] for r in rows)
    state = {(r["model"], r["context"]): r["state_compact_mib"] for r in rows}
    assert state[("deltanet+w8", 16)] == state[("deltanet+w8", 32)]  # constant: the ring buffer
    # the window cache on top of the linear state: 2 layers x K, V x 2 KV heads x (8 + 4 sinks) x 16 x 4 bytes + count
    extra = (2 * (2 * 2 * (8 + H.DEFAULT_SINKS) * 16 * 4 + 8)) / 2**20
    assert state[("deltanet+w8", 32)] - state[("deltanet", 32)] == pytest.approx(extra, rel=1e-9)
    with pytest.raises(bench.BenchError, match="deltanet\\+w64"):
        bench.build_model("deltanet+64", str(tmp_path / "teacher"), torch.float32, "cpu")


def _tiny_teacher_and_blocks():
    """A 2-layer Llama teacher (GQA) and 8 blocks of 16 tokens, for the stage tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=64)).eval().requires_grad_(False)
    return teacher, torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stages_train_the_gate_of_a_hybrid(stage, tmp_path):
    from linearize import params as P
    from linearize import runs as RF
    from linearize import stages as S

    teacher, blocks = _tiny_teacher_and_blocks()
    params = P.resolve("deltanet", overrides=dict(
        seq_len=16, batch_size=4, val_blocks=2, val_batch_size=2, run_name="h", qkv_copy=True, warmup_fraction=0.0,
        decay_fraction=0.0, hybrid_window=4, hybrid_sinks=1, **{f"stage{stage}_tokens": 64 * 2,
                                                                 f"stage{stage}_lr": 1e-2}))
    run = RF.Run(params, root=tmp_path)
    student, _ = RF.load_student(run, teacher, params, stage)
    assert all(m.hybrid is not None and m.hybrid.window == 4 for m in student.mixers)
    before = [m.hybrid.mix_logit.detach().clone() for m in student.mixers]
    res = S.train_stage(stage, student, teacher, blocks, params, run, progress=False)
    losses = [m["loss"] for m in run.metrics() if m.get("event") == "step" and m["stage"] == stage]
    assert losses and all(math.isfinite(x) for x in losses)
    assert all(not torch.equal(b, m.hybrid.mix_logit) for b, m in zip(before, res.student.mixers))


def test_the_mix_gets_its_own_learning_rate(tmp_path):
    """hybrid_mix_lr: Adam's first step moves every parameter by its learning rate (lr g / (|g| +
    eps), whatever the gradient's size), so with the stage at 1e-6 and the mix at 0.1, one step
    moves the mix logits by 0.1 and nothing else by more than 1e-6 (plus weight decay)."""
    from linearize import params as P
    from linearize import runs as RF
    from linearize import stages as S

    teacher, blocks = _tiny_teacher_and_blocks()
    params = P.resolve("deltanet", overrides=dict(
        seq_len=16, batch_size=4, val_blocks=2, val_batch_size=2, run_name="h", qkv_copy=True, warmup_fraction=0.0,
        decay_fraction=0.0, min_lr_ratio=1.0, hybrid_window=4, hybrid_sinks=1, hybrid_mix=0.5, hybrid_mix_lr=0.1,
        stage3_tokens=4 * 16, stage3_lr=1e-6))
    run = RF.Run(params, root=tmp_path)
    student, _ = RF.load_student(run, teacher, params, 3)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = S.train_stage(3, student, teacher, blocks, params, run, progress=False)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in res.student.named_parameters() if n in before}
    gates = {n: d for n, d in moved.items() if n.endswith("hybrid.mix_logit")}
    assert len(gates) == 2 and all(d == pytest.approx(0.1, rel=1e-3) for d in gates.values()), gates
    assert max(d for n, d in moved.items() if n not in gates) < 1e-5
    with pytest.raises(P.ParamsError, match="hybrid_mix_lr must be > 0"):
        P.resolve("deltanet", overrides={"hybrid_window": 4, "hybrid_mix_lr": 0})
