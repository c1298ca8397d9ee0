"""The converter and the student HF model, checked against the teacher itself.

Most tests use a tiny random Llama in float64 (hidden 64, 2 layers, 4 query heads sharing 2 KV
heads), so exact agreement can be asked for; one test converts the real embedded teacher.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import linearize
from linearize import mixers
from linearize.convert import ConversionError, convert, parameter_table
from linearize.modeling import LinearizedLlamaForCausalLM, MixerCache, generation_state_bytes

ALL = mixers.available()
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def student_params(name):
    """Parametrise over every registered student; one whose module is missing is reported as skipped."""
    try:
        mixers.get(name)
    except ModuleNotFoundError as err:
        return pytest.param(name, marks=pytest.mark.skip(reason=f"mixer {name!r} not importable: {err}"))
    return name


STUDENTS = [student_params(n) for n in ALL]


def tiny_teacher(tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    # random norm weights, so a norm that was not copied shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def quiet_convert(teacher, name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(teacher, name, chunk_size=4, **kw)


# ---------------------------------------------------------------------------------------
# softmax student == teacher
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_softmax_student_reproduces_teacher_float64(tie, ids):
    teacher = tiny_teacher(tie=tie)
    student = convert(teacher, "llama")  # the alias of softmax
    assert student.config.mixer == "softmax" and student.config.tie_word_embeddings == tie
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_softmax_student_reproduces_real_teacher():
    from linearize.teacher import TeacherError, load_teacher

    try:
        teacher, tok = load_teacher()
    except TeacherError as err:
        pytest.skip(f"embedded teacher not installed: {err}")
    student = convert(teacher, "softmax")
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids).logits
    # float32, 30 layers, sdpa (teacher) against the mixer's attention: rounding only
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)
    assert torch.equal(got[0, -1].argmax(), expected[0, -1].argmax())


# ---------------------------------------------------------------------------------------
# what is copied is bit-identical
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STUDENTS)
def test_copied_parameters_are_bit_identical(teacher, name):
    student = quiet_convert(teacher, name)
    t_params = dict(teacher.named_parameters())
    shared = [n for n, _ in student.named_parameters() if ".self_attn." not in n]
    assert shared, "nothing outside the mixers?"
    for n, p in student.named_parameters():
        if ".self_attn." in n:
            continue
        assert torch.equal(p, t_params[n]), n
    cls = mixers.get(name)
    for t_layer, mixer in zip(teacher.model.layers, student.mixers):
        copied = [p for p in PROJECTIONS if hasattr(mixer, p)]
        assert "q_proj" in copied and "v_proj" in copied and "o_proj" in copied
        assert ("k_proj" in copied) == cls.has_key
        for proj in copied:
            assert torch.equal(getattr(mixer, proj).weight, getattr(t_layer.self_attn, proj).weight), proj


def test_qkv_copy_false_copies_only_shared_weights(teacher):
    student = convert(teacher, "gla", qkv_copy=False)
    mixer, t_attn = student.mixers[0], teacher.model.layers[0].self_attn
    for proj in PROJECTIONS:
        assert not torch.equal(getattr(mixer, proj).weight, getattr(t_attn, proj).weight), proj
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    assert any("qkv_copy=False" in note for _, note in student.conversion_notes)
    assert student.config.qkv_copy is False


@pytest.mark.parametrize("name", [n for n in ALL if not mixers.spec(n).has_key])
def test_qkv_copy_into_key_free_mixer_warns_and_notes(teacher, name):
    with pytest.warns(UserWarning, match="no key projection"):
        student = convert(teacher, name)
    notes = [note for _, note in student.conversion_notes]
    assert any(note.startswith("k_proj: not copied") for note in notes), notes
    assert any(note.startswith("q_proj: copied") for note in notes), notes


# ---------------------------------------------------------------------------------------
# materialised A against the teacher's scores
# ---------------------------------------------------------------------------------------
def teacher_scores(teacher, ids, layer: int, softmax: bool):
    """Layer ``layer``'s causally masked scaled Q K^T (or its softmax), from the teacher's weights."""
    with torch.no_grad():
        hidden = teacher(ids, output_hidden_states=True).hidden_states[layer]
        block = teacher.model.layers[layer]
        x = block.input_layernorm(hidden)
        b, t, _ = x.shape
        attn = block.self_attn
        q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        cos, sin = teacher.model.rotary_emb(x, torch.arange(t)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, attn.num_key_value_groups)  # query head h reads KV head h // groups
        scores = q @ k.transpose(-1, -2) * attn.scaling
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        if softmax:
            return scores.masked_fill(future, float("-inf")).softmax(-1), x, (cos, sin)
        return scores.masked_fill(future, 0.0), x, (cos, sin)


@pytest.mark.parametrize("layer", [0, 1])
def test_linear_student_matrix_equals_teacher_scores(teacher, ids, layer):
    """QKV copy + identity feature map + RoPE + no decay: A is the teacher's masked Q K^T / sqrt(d).

    GLA has the identity feature map and no normaliser; RoPE is its option ``rope``; its
    forget gate with bias 1e4 has retention sigmoid(1e4)^(1/16), which is 1.0 in float64, so
    no decay is left."""
    student = convert(teacher, "gla", mixer_options={"rope": True, "forget_bias": 1e4})
    expected, x, pe = teacher_scores(teacher, ids, layer, softmax=False)
    with torch.no_grad():
        got = student.mixers[layer].mixing_matrix(x, pe)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # and the copy really matters: without it the matrix is something else
    fresh = convert(teacher, "gla", qkv_copy=False, mixer_options={"rope": True, "forget_bias": 1e4})
    with torch.no_grad():
        assert (fresh.mixers[layer].mixing_matrix(x, pe) - expected).abs().max() > 1e-3


def test_softmax_student_matrix_equals_teacher_attention(teacher, ids):
    student = convert(teacher, "softmax")
    expected, x, pe = teacher_scores(teacher, ids, 1, softmax=True)
    with torch.no_grad():
        got = student.mixers[1].mixing_matrix(x, pe)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# generation runs on the state and matches teacher forcing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STUDENTS)
def test_teacher_forced_logits_equal_generation_logits(teacher, ids, name):
    student = quiet_convert(teacher, name)
    prompt, new = ids[:, :6], 5
    fed = []
    hook = student.mixers[0].register_forward_hook(lambda m, args, out: fed.append(args[0].shape[1]))
    with torch.no_grad():
        out = student.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    hook.remove()
    # prompt once, then one token per step: the state carries the context
    assert fed == [6] + [1] * (new - 1), fed
    assert isinstance(out.cache, MixerCache) and out.cache.get_seq_length() == 6 + new - 1
    with torch.no_grad():
        forced = student(out.sequences[:, :-1]).logits[:, 5:]
    # generate() hands logits back in float32
    torch.testing.assert_close(torch.stack(out.logits, dim=1), forced.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.sequences[:, 6:], forced.argmax(-1))

    # The same state driven by hand stays in float64: a 3-token prompt (chunked form from the
    # empty state), a 3-token continuation (chunked form from a carried state), then single steps.
    seq = out.sequences
    with torch.no_grad():
        full = student(seq[:, :-1]).logits
        step = student(seq[:, :3], use_cache=True)
        pieces = [step.logits]
        step = student(seq[:, 3:6], cache=step.cache)
        pieces.append(step.logits)
        for t in range(6, seq.shape[1] - 1):
            step = student(seq[:, t:t + 1], cache=step.cache)
            pieces.append(step.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)
    assert step.cache.get_seq_length() == seq.shape[1] - 1


@pytest.mark.parametrize("name", STUDENTS)
def test_state_memory_is_constant_for_recurrent_students(teacher, name):
    student = quiet_convert(teacher, name)
    sizes = [generation_state_bytes(student, 2, n) for n in (4, 64, 4096)]
    measured = student(torch.ones(2, 64, dtype=torch.long), use_cache=True).cache.nbytes()
    assert sizes[1] == measured
    if name == "softmax":  # keys and values: 2 x layers x batch x KV heads x tokens x head dim x 8 bytes
        assert sizes == [2 * 2 * 2 * 2 * n * 16 * 8 for n in (4, 64, 4096)]
    else:
        assert sizes[0] == sizes[1] == sizes[2]


def test_softmax_student_beam_search_matches_teacher(teacher, ids):
    """Beam search reorders the MixerCache (reorder_cache): same beams as the teacher's KV cache."""
    student = convert(teacher, "softmax")
    prompt = ids[:, :5]
    with torch.no_grad():
        expected = teacher.generate(prompt, num_beams=3, max_new_tokens=4, do_sample=False)
        got = student.generate(prompt, num_beams=3, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


def test_generate_continues_from_a_returned_cache(teacher, ids):
    student = convert(teacher, "xlstm")
    prompt = ids[:, :6]
    with torch.no_grad():
        first = student.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert first.cache.get_seq_length() == 6 + 3 - 1  # the last token is not consumed yet
        resumed = student.generate(first.sequences, cache=first.cache, max_new_tokens=3, do_sample=False)
        at_once = student.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(resumed, at_once)


def test_lm_eval_hflm_takes_the_in_memory_student():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from linearize.teacher import TeacherError, load_teacher

    try:
        _, tok = load_teacher()
    except TeacherError as err:
        pytest.skip(f"embedded teacher not installed: {err}")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    student = convert(LlamaForCausalLM(config).eval(), "gla")
    lm = HFLM(pretrained=student, tokenizer=tok, device="cpu", batch_size=2, backend="causal")
    context, continuation = "The capital of France is", " Paris"
    reqs = [Instance("loglikelihood", {}, (context, continuation), 0),
            Instance("loglikelihood", {}, (context + " a city called", continuation), 1)]
    (ll, _), _ = lm.loglikelihood(reqs)
    # the same number by hand: log p(continuation | context) from the student's logits
    ctx, cont = tok(context).input_ids, tok(continuation).input_ids
    with torch.no_grad():
        logp = student(torch.tensor([ctx + cont])).logits.log_softmax(-1)[0]
    expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert ll == pytest.approx(expected, abs=1e-4)


def test_padded_batches_are_refused(teacher):
    student = convert(teacher, "gla")
    ids = torch.randint(1, 97, (2, 6))
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="Left padding"):
        student(ids, attention_mask=left)
    with pytest.raises(ValueError, match="padding is not supported"):
        student.generate(ids, attention_mask=left, max_new_tokens=2, do_sample=False)
    # right padding is harmless when scoring: real positions never see later ones
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = student(ids, attention_mask=right).logits
        plain = student(ids[:1, :4]).logits
    torch.testing.assert_close(padded[:1, :4], plain, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STUDENTS)
def test_save_load_roundtrip(teacher, ids, name, tmp_path):
    student = quiet_convert(teacher, name, mixer_options={"forget_bias": 2.5})
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert isinstance(loaded, LinearizedLlamaForCausalLM)
    assert loaded.config.mixer == name and loaded.config.mixer_options == {"forget_bias": 2.5}
    before, after = student.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # buffers outside the checkpoint (rebuilt on load) too
    for (n, b1), (_, b2) in zip(student.named_buffers(), loaded.named_buffers()):
        assert torch.equal(b1, b2), n
    with torch.no_grad():
        expected = student(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-12)
        # Bit-identical once the loaded tensors sit in freshly allocated memory: the last-ulp
        # differences above come from BLAS kernels choosing paths by the alignment of the
        # memory-mapped safetensors data, not from the weights.
        for p in loaded.parameters():
            p.data = p.data.clone()
        assert torch.equal(loaded(ids).logits, expected)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def test_unknown_student_lists_valid_names(teacher):
    with pytest.raises(ConversionError, match="Valid students: softmax, xlstm, gla"):
        convert(teacher, "transformer-xl")


def test_non_llama_teacher_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConversionError, match="supported teachers are Llama-architecture"):
        convert(gpt2, "gla")


def test_import_linearize_registers_auto_classes():
    from transformers import AutoConfig

    assert linearize.modeling.LinearizedLlamaConfig is type(AutoConfig.for_model("linearized_llama"))


# ---------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------
def test_parameter_table(teacher):
    teacher_params, rows = parameter_table(teacher)
    assert [r.student for r in rows] == ALL
    by = {r.student: r for r in rows}
    assert teacher_params == sum(p.numel() for p in teacher.parameters())
    assert by["softmax"].params == teacher_params and by["softmax"].growth == 1.0
    # the counts are those of real students, not of a formula
    gla = quiet_convert(teacher, "gla")
    assert by["gla"].params == sum(p.numel() for p in gla.parameters())
    assert by["gla"].mixer_params == sum(p.numel() for m in gla.mixers for p in m.parameters())
    assert by["retnet"].paper_growth == pytest.approx(566 / 350)
