"""The training stages on a tiny random Llama teacher: losses fall, resume is exact, a NaN
stops the run with its last checkpoint intact, checkpoints are written atomically."""
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from linearize import losses, mixers
from linearize import params as P
from linearize import stages as S
from linearize import runs as RF
from linearize import runfiles
from linearize import training as TR

SEQ = 16  # conftest.STAGE_SEQ, the length of stage_blocks


@pytest.fixture(scope="module")
def teacher(stage_teacher):
    return stage_teacher


@pytest.fixture(scope="module")
def blocks(stage_blocks):
    return stage_blocks


def _params(arch="softmax", **over):
    base = dict(seq_len=SEQ, batch_size=4, stage1_tokens=64 * 12, stage2_tokens=64 * 12, stage3_tokens=64 * 12,
                stage1_lr=3e-3, stage2_lr=3e-3, stage3_lr=3e-3, checkpoint_every=3, run_name="t",
                qkv_copy=False, val_blocks=2, val_batch_size=2, warmup_fraction=0.0, decay_fraction=0.0,
                fit_spread=False)  # the fit and gate init on the first blocks, which the tests name
    base.update(over)
    return P.resolve(arch, overrides=base)


def _losses(run, stage):
    return [m["loss"] for m in run.metrics() if m.get("event") == "step" and m["stage"] == stage]


def _train(stage, teacher, blocks, params, root, start_student=None):
    run = RF.Run(params, root=root)
    student, start = RF.load_student(run, teacher, params, stage)
    if start_student is not None:
        student.load_state_dict(start_student.state_dict())
    return run, S.train_stage(stage, student, teacher, blocks, params, run, start=start, progress=False)


# --- each stage lowers its own loss --------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_lowers_its_loss(stage, teacher, blocks, tmp_path):
    # Four blocks and batch 4: every step sees the same batch, so the loss must fall steadily.
    run, res = _train(stage, teacher, blocks[:4], _params(), tmp_path)
    curve = _losses(run, stage)
    assert res.finished and len(curve) == 12
    # stage 3 includes the CE to random next tokens, whose floor is high
    assert curve[-1] < {1: 0.7, 2: 0.7, 3: 0.85}[stage] * curve[0], curve
    assert all(math.isfinite(v) for v in curve)
    done = json.loads((tmp_path / "softmax" / "t" / f"stage{stage}" / "done.json").read_text())
    assert done["steps"] == 12 and done["tokens"] == 12 * 4 * SEQ


@pytest.mark.parametrize("arch", ["gla", "deltanet", "xlstm"])
def test_alignment_lowers_loss_for_linear_students(arch, teacher, blocks, tmp_path):
    try:
        mixers.get(arch)
    except (ImportError, ModuleNotFoundError, AttributeError):
        pytest.skip(f"mixer {arch} not available yet")
    for stage in (1, 2):
        run, _ = _train(stage, teacher, blocks[:4], _params(arch, run_name=f"s{stage}"), tmp_path)
        curve = _losses(run, stage)
        assert curve[-1] < 0.9 * curve[0], (stage, curve)


def test_alignment_losses_vanish_for_a_copied_softmax_student(teacher, blocks, tmp_path):
    # Independent reference: a softmax student with the teacher's Q/K/V/O *is* the teacher,
    # so its attention maps and layer outputs match the teacher's and both losses are ~0.
    params = _params(qkv_copy=True, stage1_tokens=64, stage2_tokens=64)
    for stage in (1, 2):
        run, _ = _train(stage, teacher, blocks[:4], {**params, "run_name": f"c{stage}"}, tmp_path)
        assert _losses(run, stage)[0] < 1e-4


def test_stage3_trains_only_what_it_is_told(teacher, blocks, tmp_path):
    params = _params(stage3_tokens=64 * 2, stage3_train="mixers")
    run = RF.Run(params, root=tmp_path)
    student, _ = RF.load_student(run, teacher, params, 3)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = S.train_stage(3, student, teacher, blocks, params, run, progress=False)
    changed = {n for n, p in res.student.named_parameters() if not torch.equal(before[n], p)}
    mixer_params = {n for n in before if ".self_attn." in n}
    assert changed == mixer_params
    # the teacher was never written to
    assert all(not p.requires_grad for p in teacher.parameters())


def test_stages_1_and_2_freeze_everything_but_the_mixers(teacher, blocks, tmp_path):
    params = _params(stage2_tokens=64 * 2)
    run = RF.Run(params, root=tmp_path)
    student, _ = RF.load_student(run, teacher, params, 2)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = S.train_stage(2, student, teacher, blocks, params, run, progress=False)
    changed = {n for n, p in res.student.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".self_attn." in n for n in changed)


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_autocast_matches_fp32_loosely(stage, teacher, blocks, tmp_path):
    params = _params(**{f"stage{stage}_tokens": 64 * 2})
    fp32_run, _ = _train(stage, teacher, blocks, {**params, "run_name": "fp32"}, tmp_path)
    bf16_run, _ = _train(stage, teacher, blocks, {**params, "run_name": "bf16", "bf16": True}, tmp_path)
    a, b = _losses(fp32_run, stage), _losses(bf16_run, stage)
    assert a != b  # autocast really changed the arithmetic
    assert b == pytest.approx(a, rel=0.05)


# --- resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 3])
def test_kill_and_resume_reproduces_the_uninterrupted_curve(stage, teacher, blocks, tmp_path, monkeypatch):
    params = _params(warmup_fraction=0.25, decay_fraction=0.25)  # exercise the schedule state
    ref_run, ref = _train(stage, teacher, blocks, {**params, "run_name": "ref"}, tmp_path)
    reference = _losses(ref_run, stage)

    # "Kill" the run while it logs step 5: the last checkpoint is at step 3, and the line of
    # step 4 is already in metrics.jsonl (it must be dropped on resume).
    real_log = RF.Run.log

    def dying_log(self, record):
        if record.get("event") == "step" and record["step"] == 5:
            raise KeyboardInterrupt("simulated kill")
        real_log(self, record)

    monkeypatch.setattr(RF.Run, "log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        _train(stage, teacher, blocks, {**params, "run_name": "killed"}, tmp_path)
    monkeypatch.setattr(RF.Run, "log", real_log)
    ckpt = tmp_path / "softmax" / "killed" / f"stage{stage}" / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=False)["step"] == 3

    run, res = _train(stage, teacher, blocks, {**params, "run_name": "killed"}, tmp_path)
    assert _losses(run, stage) == reference  # bit-identical curve, no duplicate steps
    for (n, a), b in zip(ref.student.state_dict().items(), res.student.state_dict().values()):
        assert torch.equal(a, b), n
    assert not ckpt.exists()  # a finished stage keeps student.pt, not the resume state


def test_stop_after_steps_then_resume(teacher, blocks, tmp_path):
    params = _params()
    ref_run, _ = _train(2, teacher, blocks, {**params, "run_name": "ref"}, tmp_path)
    run, res = _train(2, teacher, blocks, {**params, "run_name": "r", "stop_after_steps": 5}, tmp_path)
    assert not res.finished and res.steps == 5
    run, res = _train(2, teacher, blocks, {**params, "run_name": "r"}, tmp_path)
    assert res.finished and _losses(run, 2) == _losses(ref_run, 2)


def test_resume_refuses_changed_parameters(teacher, blocks, tmp_path):
    params = _params(stop_after_steps=2)
    _train(1, teacher, blocks, params, tmp_path)
    with pytest.raises(RF.RunError, match="stage1_lr"):
        _train(1, teacher, blocks, {**params, "stage1_lr": 1e-4}, tmp_path)


def test_readout_fit_runs_after_conversion_and_enters_the_identity_only_when_on(teacher, blocks, tmp_path):
    off = _params("deltanet", qkv_copy=True)
    on = _params("deltanet", qkv_copy=True, readout_fit_tokens=8 * SEQ, run_name="fit")
    assert "readout_fit_tokens" not in S.stage_identity(off, 1, "conversion")  # older run folders still match
    assert S.stage_identity(on, 1, "conversion")["readout_fit_tokens"] == 8 * SEQ
    plain = RF.load_student(RF.Run(off, root=tmp_path), teacher, off, 1)[0]
    run = RF.Run(on, root=tmp_path)
    fitted, start = RF.load_student(run, teacher, on, 1, blocks)
    assert start == "conversion"
    [event] = [m for m in run.metrics() if m.get("event") == "readout_fit"]
    assert event["tokens"] == 8 * SEQ and len(event["rel_error_after"]) == 2
    assert all(a <= b for a, b in zip(event["rel_error_after"], event["rel_error_before"]))
    changed = [n for n, p in fitted.state_dict().items() if not torch.equal(p, plain.state_dict()[n])]
    assert changed and all(n.endswith("self_attn.o_proj.weight") for n in changed)
    with pytest.raises(ValueError, match="needs the training blocks"):
        RF.load_student(RF.Run({**on, "run_name": "fit2"}, root=tmp_path), teacher, on, 1)


def test_gate_init_sets_the_gates_from_the_teacher_when_a_run_starts_from_conversion(teacher, blocks, tmp_path):
    """gate_init_tokens > 0 (the study's qkv-fit-at-gi): a run that starts from the conversion
    gets every head's decay from the teacher's attention distances on its first training
    blocks, logs it, and keys its stages on it; off, the run is the plain conversion."""
    from linearize import gate_init as G

    off = _params("gla", qkv_copy=True)
    on = _params("gla", qkv_copy=True, gate_init_tokens=8 * SEQ, run_name="gi")
    assert "gate_init_tokens" not in S.stage_identity(off, 3, "conversion")
    assert S.stage_identity(on, 3, "conversion")["gate_init_tokens"] == 8 * SEQ
    run = RF.Run(on, root=tmp_path)
    student, start = RF.load_student(run, teacher, on, 3, blocks)
    assert start == "conversion"
    [event] = [m for m in run.metrics() if m.get("event") == "gate_init"]
    assert event["tokens"] == 8 * SEQ and event["mixers_changed"] == len(student.model.layers)
    want = G.teacher_retention(teacher, blocks[:8], batch_size=on["batch_size"])
    for layer, gamma in zip(student.model.layers, want):
        assert torch.allclose(G.decay_of(layer.self_attn), gamma.double(), rtol=1e-4, atol=1e-6)
    plain, _ = RF.load_student(RF.Run(off, root=tmp_path), teacher, off, 3, blocks)
    assert not torch.allclose(G.decay_of(plain.model.layers[0].self_attn), want[0].double(), rtol=1e-3)


def test_a_fitted_conversion_is_kept_and_reused_only_with_the_same_parameters(teacher, blocks, tmp_path):
    on = _params("deltanet", qkv_copy=True, readout_fit_tokens=8 * SEQ, run_name="fit")
    run = RF.Run(on, root=tmp_path)
    first, _ = RF.load_student(run, teacher, on, 3, blocks)
    saved = torch.load(run.dir / "conversion" / "fitted_student.pt", weights_only=True)["state"]
    assert sorted(saved) == [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]  # only what the fit wrote
    again, _ = RF.load_student(run, teacher, on, 3, blocks[:8])  # the blocks it would fit on
    assert len([m for m in run.metrics() if m.get("event") == "readout_fit"]) == 1  # not refitted
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    stronger = {**on, "readout_fit_ridge": 10.0}
    refit, _ = RF.load_student(RF.Run(stronger, root=tmp_path), teacher, stronger, 3, blocks)
    assert len([m for m in run.metrics() if m.get("event") == "readout_fit"]) == 2
    key = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(refit.state_dict()[key], first.state_dict()[key])


def test_a_finished_stage_is_not_reused_for_other_parameters(teacher, blocks, tmp_path, monkeypatch):
    import linearize.data

    monkeypatch.setattr(linearize.data, "token_blocks", lambda tok, corpus, seq, split, *a, **k: blocks[:8])
    params = _params("deltanet", matrix_mixing=False, h2h=False, measure_teacher_throughput=False,
                     stage3_tokens=64 * 2)
    out = S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
    assert out["finished"] and RF.Run(params, root=tmp_path).done(3) is not None
    S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)  # same parameters: reused
    with pytest.raises(RF.RunError, match="stage3_lr"):
        S.run_pipeline({**params, "stage3_lr": 1e-5}, teacher=teacher, root=tmp_path, progress=False)


def test_numbers_from_the_command_line_are_numbers():
    import yaml

    # `--set stage2_lr=1e-4` goes through yaml.safe_load, which (YAML 1.1) returns the string '1e-4'
    raw = {k: yaml.safe_load(v) for k, v in (("stage2_lr", "1e-4"), ("stage1_tokens", "1e6"))}
    assert raw["stage2_lr"] == "1e-4"
    params = P.resolve("gla", overrides=raw)
    assert params["stage2_lr"] == 1e-4 and isinstance(params["stage2_lr"], float)
    assert params["stage1_tokens"] == 1_000_000 and isinstance(params["stage1_tokens"], int)
    with pytest.raises(P.ParamsError, match="stage1_lr must be a number, got 'fast'"):
        P.resolve("gla", overrides={"stage1_lr": "fast"})
    with pytest.raises(P.ParamsError, match="seq_len must be a whole number"):
        P.resolve("gla", overrides={"seq_len": 12.5})
    with pytest.raises(P.ParamsError, match="readout_fit_ridge > 0"):
        P.resolve("gla", overrides={"readout_fit_ridge": 0})


def test_stage3_alone_records_which_alignment_stages_ran(teacher, blocks, tmp_path):
    params = _params(run_name="kd")  # defaults say matrix_mixing = h2h = True
    assert params["matrix_mixing"] and params["h2h"]
    assert not any(RF.with_alignment_record(params, tmp_path)[k] for k in ("matrix_mixing", "h2h"))
    _train(1, teacher, blocks, params, tmp_path)
    rec = RF.with_alignment_record(params, tmp_path)
    assert rec["matrix_mixing"] and not rec["h2h"]


# --- failures --------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_good_checkpoint(teacher, blocks, tmp_path, monkeypatch):
    params = _params()
    calls = {"n": 0}
    real = losses.hidden_loss

    def poisoned(h_t, h_s, kind="l2"):
        calls["n"] += 1
        out = real(h_t, h_s, kind)
        return out * float("nan") if calls["n"] == 2 * 5 else out  # 2 layers: step 5, layer 1

    monkeypatch.setattr(losses, "hidden_loss", poisoned)
    run = RF.Run(params, root=tmp_path)
    student, _ = RF.load_student(run, teacher, params, 2)
    with pytest.raises(TR.NonFiniteLossError, match=r"nan at step 5.*checkpoint.pt \(step 3\)"):
        S.train_stage(2, student, teacher, blocks, params, run, progress=False)
    state = torch.load(run.dir / "stage2" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert not (run.dir / "stage2" / "done.json").exists()


def test_atomic_save_survives_a_kill_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    runfiles.atomic_save({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_half_way(obj, fh, *a, **k):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        runfiles.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(path, weights_only=False)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    # no temp file left; the checksum record still matches the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    from linearize.runfiles import verify
    verify(path, "unused")


# --- schedules, data order, parameters --------------------------------------------------------
def test_lr_schedules_by_hand():
    # 10 steps, warmup 2, WSD decay over the last 4 steps towards 0 (reached one step later).
    wsd = [TR.lr_factor("wsd", s, 10, 0.2, 0.4, 0.0) for s in range(10)]
    assert wsd == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    # linear: warmup 2, then decay over the remaining 8 steps towards min ratio 0.2
    lin = [TR.lr_factor("linear", s, 10, 0.2, 0.0, 0.2) for s in range(10)]
    assert lin == pytest.approx([0.5, 1.0] + [1 - 0.8 * k / 9 for k in range(1, 9)])


def test_block_order_resumes_mid_epoch_and_permutes_each_epoch():
    full = list(TR.BlockOrder(7, seed=3, start=0, count=20))
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))
    assert full[:7] != full[7:14]
    assert list(TR.BlockOrder(7, seed=3, start=9, count=11)) == full[9:]


def test_params_resolution_and_errors(tmp_path, monkeypatch):
    p = P.resolve("gla")
    assert p["preset"] == "cpu-quick" and p["run_name"] == "cpu-quick"
    assert P.resolve("gla", overrides={"seq_len": 32, "stage1_lr": None})["seq_len"] == 32
    assert P.resolve("mlstm")["arch"] == "xlstm"
    assert P.resolve("gla", preset="paper")["batch_size"] == 48
    with pytest.raises(P.ParamsError, match="valid keys:.*stage1_tokens"):
        P.resolve("gla", overrides={"stage1_tokenz": 5})
    with pytest.raises(P.ParamsError, match="valid names:.*deltanet"):
        P.resolve("transformer")
    with pytest.raises(P.ParamsError, match="valid presets:.*cpu-quick"):
        P.resolve("gla", preset="huge")
    # precedence: preset < student < overrides
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "x.yaml").write_text("seq_len: 64\nbatch_size: 2\nstage1_lr: 0.1\n")
    (tmp_path / "students.yaml").write_text("gla: {batch_size: 3, stage1_lr: 0.2}\n")
    monkeypatch.setattr(P, "PARAMS_DIR", tmp_path)
    q = P.resolve("gla", preset="x", overrides={"stage1_lr": 0.3})
    assert (q["seq_len"], q["batch_size"], q["stage1_lr"]) == (64, 3, 0.3)
    (tmp_path / "students.yaml").write_text("gla: {lr: 0.2}\n")
    with pytest.raises(P.ParamsError, match="students.yaml"):
        P.resolve("gla", preset="x")


# --- the notebooks, end to end on a tiny teacher and corpus -----------------------------------
def _tiny_teacher_folder(root):
    """A 2-layer random Llama with a word-level tokenizer, and a corpus of 30 small documents."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(60)]
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(30):
        (corpus / f"doc{d:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(root / "teacher")
    fast.save_pretrained(root / "teacher")
    return root / "teacher", corpus


@pytest.mark.slow
def test_notebooks_run_under_papermill(tmp_path):
    import papermill as pm

    from linearize.paths import ROOT

    teacher_dir, corpus = _tiny_teacher_folder(tmp_path)
    common = dict(arch="gla", teacher=str(teacher_dir), corpus=str(corpus), output_root=str(tmp_path / "out"))
    tiny = {"seq_len": 16, "val_blocks": 2, "val_fraction": 0.2, "checkpoint_every": 2}
    pm.execute_notebook(str(ROOT / "notebooks" / "01_align.ipynb"), str(tmp_path / "01.ipynb"), cwd=str(tmp_path),
                        parameters={**common, "stage1_tokens": 192, "stage2_tokens": 192, "overrides": tiny},
                        progress_bar=False)
    pm.execute_notebook(str(ROOT / "notebooks" / "02_distill.ipynb"), str(tmp_path / "02.ipynb"), cwd=str(tmp_path),
                        parameters={**common, "stage3_tokens": 192, "overrides": tiny}, progress_bar=False)
    run_dir = tmp_path / "out" / "gla" / "cpu-quick"
    _, evals = RF.metrics_frames(run_dir)
    assert list(evals["after"]) == ["conversion", "stage1", "stage2", "stage3"]
    assert json.loads((run_dir / "stage3" / "done.json").read_text())["start"] == "stage2"  # 02 continued 01
    assert (run_dir / "align_losses.png").exists() and (run_dir / "distill_loss.png").exists()
    steps, _ = RF.metrics_frames(run_dir)
    assert steps.groupby("stage").size().to_dict() == {1: 3, 2: 3, 3: 3}  # 192 tokens / (4 x 16)


@pytest.mark.slow
def test_two_processes_reproduce_one(tmp_path):
    """Data-parallel (2 CPU processes, gloo) with half the per-process batch follows the
    single-process curve: the layer-local stages average gradients by hand, stage 3 via DDP."""
    import os
    import subprocess
    import sys

    teacher_dir, corpus = _tiny_teacher_folder(tmp_path)
    common = ["-m", "linearize.stages", "--arch", "gla", "--set", f"teacher={teacher_dir}", "--set",
              f"corpus={corpus}", "--set", "seq_len=16", "--set", "val_fraction=0.2", "--set", "val_blocks=2",
              "--set", "measure_teacher_throughput=false"] + [
              x for s in (1, 2, 3) for x in ("--set", f"stage{s}_tokens=384")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "--root", str(tmp_path / "one"), "--set", "batch_size=4"],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common,
                    "--root", str(tmp_path / "two"), "--set", "batch_size=2"], check=True, env=env, capture_output=True)
    one, _ = RF.metrics_frames(tmp_path / "one" / "gla" / "cpu-quick")
    two, _ = RF.metrics_frames(tmp_path / "two" / "gla" / "cpu-quick")
    assert list(one["tokens"]) == list(two["tokens"]) and len(one) == 3 * 6
    assert list(two["loss"]) == pytest.approx(list(one["loss"]), rel=1e-4)


def test_fused_adamw_follows_the_default_implementation():
    # The stages use torch's fused AdamW (a speed lever on the CPU); the update must be the
    # for-loop AdamW's, including a second group at another rate without weight decay.
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=g), torch.randn(3, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(5)]
    params = {"betas": [0.9, 0.95], "weight_decay": 0.1}
    finals = []
    for fused in (True, False):
        ps = [p.clone().requires_grad_(True) for p in start]
        groups = [{"params": [ps[0]]}, {"params": [ps[1]], "lr": 3e-2, "weight_decay": 0.0}]
        opt = TR.make_adamw(groups, 1e-2, params) if fused else torch.optim.AdamW(
            groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
        assert bool(opt.defaults["fused"]) is fused
        for step_grads in grads:
            for p, gr in zip(ps, step_grads):
                p.grad = gr.clone()
            opt.step()
        finals.append([p.detach() for p in ps])
    for got, want, before in zip(*finals, start):
        assert (got - before).abs().max() > 1e-3  # five steps moved it
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fit_spread_reads_blocks_spread_over_the_split_and_enters_the_identity_only_when_on():
    from linearize.runs import _fit_identity, fit_blocks

    blocks = torch.arange(100 * 4).view(100, 4)
    plain = _params(readout_fit_tokens=16)
    assert torch.equal(fit_blocks(blocks, 16, plain, "readout_fit_tokens"), blocks[:4])
    spread = {**plain, "fit_spread": True}
    picked = fit_blocks(blocks, 16, spread, "readout_fit_tokens")
    assert picked[:, 0].tolist() == [0, 132, 264, 396]  # blocks 0, 33, 66, 99: first to last, evenly
    with pytest.raises(ValueError, match="readout_fit_tokens=404 asks for 101 blocks"):
        fit_blocks(blocks, 404, spread, "readout_fit_tokens")
    assert "fit_spread" not in _fit_identity(plain) and "fit_spread" not in S.stage_identity(plain, 3, "conversion")
    assert _fit_identity(spread)["fit_spread"] is True and S.stage_identity(spread, 3, "conversion")["fit_spread"]
    # make study's presets spread; the grid's keeps the first blocks its finished cells used
    assert P.resolve("gla", "cpu-quick")["fit_spread"] and P.resolve("gla", "cpu-study")["fit_spread"]
    assert not P.resolve("gla", "cpu-grid")["fit_spread"]
