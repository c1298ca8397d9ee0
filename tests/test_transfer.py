"""Stage 0, attention-output transfer (linearize.transfer), on a tiny random Llama teacher:
the loss against values computed through transformers' own forward, ~0 for a copied softmax
student, what trains under each at_train, LoRA merged back, exact resume, curve points."""
import contextlib
import json
import math

import pytest
import torch

from linearize import params as P
from linearize import stages as S
from linearize import runs as RF
from linearize import transfer as T

SEQ = 16  # conftest.STAGE_SEQ, the length of stage_blocks


@pytest.fixture(scope="module")
def teacher(stage_teacher):
    return stage_teacher


@pytest.fixture(scope="module")
def blocks(stage_blocks):
    return stage_blocks


def _params(arch="deltanet", **over):
    base = dict(seq_len=SEQ, batch_size=4, stage0_tokens=64 * 12, stage0_lr=3e-3, stage3_tokens=64 * 2,
                checkpoint_every=3, run_name="t", qkv_copy=True, val_blocks=2, val_batch_size=2,
                warmup_fraction=0.0, decay_fraction=0.0, attention_transfer=True, matrix_mixing=False,
                h2h=False, distill=False)
    base.update(over)
    return P.resolve(arch, overrides=base)


def _losses(run, stage=0):
    return [m["loss"] for m in run.metrics() if m.get("event") == "step" and m["stage"] == stage]


def _train(teacher, blocks, params, root, stage=0):
    run = RF.Run(params, root=root)
    student, start = RF.load_student(run, teacher, params, stage)
    return run, S.train_stage(stage, student, teacher, blocks, params, run, start=start, progress=False)


def test_relative_error_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # ||pred - target||^2 = 0 + 4 + 9 + 4 = 17; ||target||^2 = 1 + 4 = 5
    assert T.relative_sq_error(pred, target).item() == pytest.approx(17 / 5)


@pytest.mark.parametrize("target", ["output", "heads"])
def test_layer_losses_match_transformers_forward(target, teacher, blocks):
    """Reference: every layer's input from transformers' own forward (output_hidden_states),
    the teacher block called as transformers calls it, the student mixer on the same input."""
    params = _params(at_target=target)
    student = RF.convert_student(teacher, params)
    ids = blocks[:2]
    _, per_layer = T.attention_transfer_step(student, teacher, ids, params, backward=lambda loss: None,
                                              autocast=contextlib.nullcontext)
    with torch.no_grad():
        out = teacher(input_ids=ids, output_hidden_states=True)
        pos = torch.arange(SEQ)[None]
        pe = teacher.model.rotary_emb(out.hidden_states[0], pos)
        mask = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None]
        expected = []
        for i, (t_layer, s_layer) in enumerate(zip(teacher.model.layers, student.model.layers)):
            x = t_layer.input_layernorm(out.hidden_states[i])
            got = {}
            hooks = [t_layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("t", a[0])),
                     s_layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("s", a[0]))]
            y_t = t_layer.self_attn(x, position_embeddings=pe, attention_mask=mask)[0]
            y_s = s_layer.self_attn(x, position_embeddings=pe)[0]
            for h in hooks:
                h.remove()
            if target == "heads":
                y_t, y_s = got["t"], got["s"]
            expected.append(((y_s - y_t) ** 2).sum().item() / (y_t ** 2).sum().item())
    assert per_layer == pytest.approx(expected, rel=1e-4)
    assert min(expected) > 1e-3  # a linear student really differs from the teacher


@pytest.mark.parametrize("target", ["output", "heads"])
def test_copied_softmax_student_has_zero_loss(target, teacher, blocks, tmp_path):
    run, _ = _train(teacher, blocks[:4], _params("softmax", at_target=target, stage0_tokens=64), tmp_path)
    assert _losses(run)[0] < 1e-8


# every subquadratic student the study grid trains with stage 0 first, except Hedgehog: on this
# toy teacher its identity-initialised softmax feature map starts at a relative error of 3e-4
# (near-uniform attention), so there is nothing for the loss to fall from (its first step at
# this test's lr 3e-3 lifts it to ~1); the test after this one runs it through stage 0.
@pytest.mark.parametrize("arch", ["gla", "deltanet", "xlstm", "hgrn2", "retnet", "mamba2", "metala", "rebased"])
def test_stage0_lowers_its_loss(arch, teacher, blocks, tmp_path):
    run, res = _train(teacher, blocks[:4], _params(arch), tmp_path)
    curve = _losses(run)
    assert res.finished and len(curve) == 12 and all(math.isfinite(v) for v in curve)
    assert curve[-1] < 0.7 * curve[0], curve


def test_stage0_runs_hedgehog_to_the_end(teacher, blocks, tmp_path):
    run, res = _train(teacher, blocks[:4], _params("hedgehog"), tmp_path)
    curve = _losses(run)
    assert res.finished and len(curve) == 12 and all(math.isfinite(v) for v in curve)
    assert max(curve[1:]) < 10 and curve[-1] < 0.5 * max(curve), curve  # it recovers from its first step


@pytest.mark.parametrize("at_train", ["mixers", "gates", "lora"])
def test_what_trains(at_train, teacher, blocks, tmp_path):
    params = _params("gla", at_train=at_train, stage0_tokens=64 * 2)
    run = RF.Run(params, root=tmp_path)
    student, _ = RF.load_student(run, teacher, params, 0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = S.train_stage(0, student, teacher, blocks, params, run, progress=False)
    after = dict(res.student.named_parameters())
    assert set(after) == set(before)  # LoRA is merged back: the converted model's keys
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".self_attn." in n for n in changed)
    proj = {n for n in changed if any(f".{p}." in n for p in T.PROJECTIONS)}
    if at_train == "gates":
        assert not proj and changed
    else:
        assert proj  # mixers: trained directly; lora: B A merged into the weights
    if at_train == "lora":
        # merged weights differ from the copy by a matrix of rank <= lora_rank
        name = next(n for n in proj if n.endswith("q_proj.weight"))
        assert torch.linalg.matrix_rank(after[name] - before[name]).item() <= params["lora_rank"]
    assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("at_train", ["mixers", "lora"])
def test_kill_and_resume_is_exact(at_train, teacher, blocks, tmp_path, monkeypatch):
    params = _params("deltanet", at_train=at_train, warmup_fraction=0.25, decay_fraction=0.25)
    ref_run, ref = _train(teacher, blocks, {**params, "run_name": "ref"}, tmp_path)
    real_log = RF.Run.log

    def dying_log(self, record):
        if record.get("event") == "step" and record["step"] == 5:
            raise KeyboardInterrupt("simulated kill")
        real_log(self, record)

    monkeypatch.setattr(RF.Run, "log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        _train(teacher, blocks, {**params, "run_name": "killed"}, tmp_path)
    monkeypatch.setattr(RF.Run, "log", real_log)
    run, res = _train(teacher, blocks, {**params, "run_name": "killed"}, tmp_path)
    assert _losses(run) == _losses(ref_run)
    for (n, a), b in zip(ref.student.state_dict().items(), res.student.state_dict().values()):
        assert torch.equal(a, b), n


def test_pipeline_logs_curve_points_and_continues_with_stage3(teacher, blocks, tmp_path):
    params = _params("gla", distill=True, stage0_tokens=64 * 4, eval_every_tokens=128)

    import linearize.data as D  # run_pipeline reads the corpus through the tokenizer: give it blocks

    orig = D.token_blocks
    D.token_blocks = lambda tok, corpus, seq, split, frac, max_blocks=None: blocks if split == "train" else blocks[:2]
    try:
        out = S.run_pipeline(params, teacher=teacher, tokenizer=None, root=tmp_path, progress=False)
    finally:
        D.token_blocks = orig
    evals = [m["after"] for m in out["run"].metrics() if m.get("event") == "eval"]
    assert evals == ["conversion", "stage0@128", "stage0", "stage3"]
    done3 = json.loads((tmp_path / "gla" / "t" / "stage3" / "done.json").read_text())
    assert done3["start"] == "stage0"
