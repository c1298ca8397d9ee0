import copy

import pytest
import torch

from linearize.teacher import TeacherError, attention_probs, iter_layers, load_teacher, resolve_teacher


def test_embedded_teacher_says_paris(teacher):
    model, tok = teacher
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_layer_maps_match_eager_attention(teacher):
    """iter_layers recomputes each layer's softmax map; eager attention is the reference."""
    model, tok = teacher
    eager, _ = load_teacher(attn_implementation="eager")
    ids = tok("Linear attention replaces the softmax with a kernel feature map.", return_tensors="pt").input_ids
    ref = eager(ids, output_attentions=True, output_hidden_states=True)
    seen = []
    for tr in iter_layers(model, ids, layers=[0, 7, 29]):
        seen.append(tr.index)
        torch.testing.assert_close(tr.attn, ref.attentions[tr.index], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(tr.hidden_in, ref.hidden_states[tr.index], atol=1e-4, rtol=1e-4)
        if tr.index < 29:  # the last hidden state HF returns is after the final norm
            torch.testing.assert_close(tr.hidden_out, ref.hidden_states[tr.index + 1], atol=1e-4, rtol=1e-4)
        assert torch.allclose(tr.attn.sum(-1), torch.ones(()), atol=1e-5)
    assert seen == [0, 7, 29]


def test_attention_probs_carry_gradients(tiny_llama):
    layer = tiny_llama.model.layers[0]
    x = torch.randn(1, 5, 64, dtype=torch.float64, requires_grad=True)
    pe = tiny_llama.model.rotary_emb(x, torch.arange(5)[None])
    a = attention_probs(layer.self_attn, x, pe)
    assert a.shape == (1, 4, 5, 5) and torch.all(a.triu(1) == 0)
    a.sum(-1).mean().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", ["no-such-teacher", "not/a/hub/id"])
def test_bad_teacher_name_is_explained(name):
    with pytest.raises(TeacherError, match="Unknown teacher"):
        resolve_teacher(name)


def test_non_llama_teacher_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="Llama-architecture"):
        load_teacher(tmp_path)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(TeacherError, match="config.json"):
        resolve_teacher(tmp_path)


def test_validation_perplexity_is_sane(teacher):
    """About 14 on modern prose (docs/environment.md) and 20-45 on these 19th-20th century speeches;
    a broken load, tokenizer or separator gives hundreds."""
    from linearize.data import token_blocks

    model, tok = teacher
    blocks = token_blocks(tok, split="validation", seq_len=256, max_blocks=4)
    with torch.no_grad():
        loss = model(blocks, labels=blocks).loss
    ppl = loss.exp().item()
    assert 4 < ppl < 80, ppl


def test_reused_teacher_outputs_equal_the_forward_and_run_the_body_once(stage_teacher, tmp_path):
    """``teacher_logits`` through ``reuse_outputs`` gives the teacher's own logits, runs the body
    once per distinct batch (in this process and in a new one), stores nothing past its byte
    budget, and steps aside under autocast or with gradients on, where a stored output would not
    be what the forward gives."""
    from linearize.teacher import TeacherOutputs, reuse_outputs, teacher_logits

    t = stage_teacher
    calls = []
    hook = t.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        ids = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            want = t(input_ids=ids).logits
        calls.clear()
        reuse_outputs(t, tmp_path / "outs")
        with torch.no_grad():
            first, again = teacher_logits(t, ids), teacher_logits(t, ids.clone())
            assert torch.equal(first, want) and torch.equal(again, want)
            assert len(calls) == 1 and (t.linearize_outputs.misses, t.linearize_outputs.hits) == (1, 1)
            other = ids.flip(0)
            assert torch.equal(teacher_logits(t, other), t(input_ids=other).logits)
            assert t.linearize_outputs.misses == 2
            # a new process's cache (same folder): from the disk, no forward
            fresh = TeacherOutputs(t, tmp_path / "outs")
            calls.clear()
            assert torch.equal(fresh.logits(ids), want) and not calls and fresh.hits == 1
            # same tokens, other shape: another batch
            assert TeacherOutputs.key(ids) != TeacherOutputs.key(ids.reshape(6, 8))
            # the budget: one more batch would pass it, so it is computed and not stored
            import linearize.teacher as T
            full = TeacherOutputs(t, tmp_path / "outs")
            files = list((tmp_path / "outs").glob("*.pt"))
            assert len(files) == 2 and full.stored_bytes == sum(f.stat().st_size for f in files)
            assert full.stored_bytes >= 2 * ids.numel() * 64 * 4  # two [3, 16, 64] float32 states
            budget, T.MAX_STORED_BYTES = T.MAX_STORED_BYTES, full.stored_bytes
            try:
                third = ids.roll(1, 1)
                calls.clear()
                assert torch.equal(full.logits(third), t(input_ids=third).logits)
                full.logits(third)
                assert len(calls) == 3 and full.misses == 2 and full.hits == 0
            finally:
                T.MAX_STORED_BYTES = budget
            with torch.autocast("cpu", dtype=torch.bfloat16):
                calls.clear()
                assert teacher_logits(t, ids).dtype == torch.bfloat16 and len(calls) == 1
        calls.clear()
        teacher_logits(t, ids)  # gradients on: the real forward
        assert len(calls) == 1
    finally:
        hook.remove()
        del t.linearize_outputs


def test_default_teacher_outputs_folder_is_per_weights(stage_teacher, monkeypatch, tmp_path):
    """Without a folder, outputs go under the user cache, in a folder named by the weights:
    another teacher (one weight changed) never reads them."""
    from linearize.teacher import TeacherOutputs

    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path))
    a = TeacherOutputs(stage_teacher).directory
    assert a.parent == tmp_path / "teacher_outputs"
    other = copy.deepcopy(stage_teacher)
    with torch.no_grad():
        other.model.norm.weight[0] += 1.0
    assert TeacherOutputs(other).directory != a


def test_a_full_disk_costs_the_reuse_not_the_step(stage_teacher, tmp_path, monkeypatch):
    """When the outputs cannot be written (disk full), the logits still come back, equal to the
    forward, with a warning that names the folder and the fix, and no partial file is left."""
    import errno

    from linearize.teacher import TeacherOutputs

    def full(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    outs = TeacherOutputs(stage_teacher, tmp_path / "outs")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(6))
    with pytest.warns(UserWarning, match="LINEARIZE_CACHE"):
        got = outs.logits(ids)
    with torch.no_grad():
        assert torch.equal(got, stage_teacher(input_ids=ids).logits)
    assert not list((tmp_path / "outs").iterdir())
