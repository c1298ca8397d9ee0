"""Crashes, concurrent use and bad input (issue 18): each test reproduces one finding.

The run-folder tests use a tiny random Llama teacher; nothing here loads the 135M teacher."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig

from linearize import mixers, runfiles
from linearize import params as P
from linearize import stages as S
from linearize import runs as RF
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
                measure_teacher_throughput=False)
    base.update(over)
    return P.resolve(arch, overrides=base)


def _train(stage, teacher, blocks, params, root):
    run = RF.Run(params, root=root)
    student, start = RF.load_student(run, teacher, params, stage)
    return run, S.train_stage(stage, student, teacher, blocks, params, run, start=start, progress=False)


def _steps(run, stage):
    return [(m["step"], m["loss"]) for m in run.metrics() if m.get("event") == "step" and m["stage"] == stage]


def _kill_at_step(monkeypatch, n):
    """Make Run.log raise (a "kill") when the line of step ``n`` is about to be written."""
    real = RF.Run.log

    def dying(self, record):
        if record.get("event") == "step" and record["step"] == n:
            raise KeyboardInterrupt("simulated kill")
        real(self, record)

    monkeypatch.setattr(RF.Run, "log", dying)
    return lambda: monkeypatch.setattr(RF.Run, "log", real)


def _pipeline_blocks(monkeypatch, blocks):
    import linearize.data

    monkeypatch.setattr(linearize.data, "token_blocks", lambda tok, corpus, seq, split, *a, **k: blocks[:8])


# --- 11, 12: parameters are validated before any work ---------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("kd_alpha", -1, "kd_alpha must be >= 0"),
    ("mixer_options", {"bogus": 1}, r"mixer_options \['bogus'\] are not options of gla; its options: .*forget_bias"),
    ("qkv_copy", "maybe", "qkv_copy must be true or false"),
    ("stage3_tokens", 0, "stage3_tokens=0 is less than one step.*distill=false"),
    ("chunk_size", 0, "chunk_size must be a positive integer"),
    ("betas", "abc", "betas must be two numbers"),
    ("stop_after_steps", "abc", "stop_after_steps must be a number"),
    ("stop_after_steps", 0, "stop_after_steps must be a positive"),
    ("stage3_lr", -1, "stage3_lr must be > 0"),
    ("stage1_lr", 0, "stage1_lr must be > 0"),
    ("backend", "cuda", "backend must be one of"),
    ("kd_temperature", 0, "kd_temperature must be > 0"),
    ("val_fraction", 1.5, "val_fraction must lie in"),
    ("run_name", "../../escape", "run_name must be a single folder name"),
    ("run_name", "/tmp/abs", "run_name must be a single folder name"),
    ("run_name", "a/b", "run_name must be a single folder name"),
    ("run_name", "..", "run_name must be a single folder name"),
])
def test_bad_parameters_are_refused_with_the_key(key, value, message):
    with pytest.raises(P.ParamsError, match=message):
        P.resolve("gla", overrides={key: value})


def test_good_values_still_pass_and_validate_rechecks_a_hand_edited_dict():
    p = P.resolve("gla", overrides={"mixer_options": {"forget_bias": 2.0}, "stop_after_steps": "3",
                                    "run_name": "cpu-quick-qkv-fit", "matrix_mixing": False, "stage1_tokens": 0})
    assert p["stop_after_steps"] == 3 and P.validate(p) is p
    with pytest.raises(P.ParamsError, match="run_name"):
        P.validate({**p, "run_name": "../x"})
    with pytest.raises(P.ParamsError, match="unknown parameter"):
        P.validate({**p, "stage1_tokenz": 1})


@pytest.mark.parametrize("name", mixers.available())
def test_declared_mixer_options_are_exactly_those_the_mixer_reads(name):
    # An independent record of what __init__ reads: a dict that notes every key looked up.
    class Recording(dict):
        def __init__(self):
            super().__init__()
            self.read = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

    options = Recording()
    cfg = mixers.MixerConfig(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, options=options)
    mixers.build(name, cfg)
    # the hybrid window's keys are read by the shared hybrid frame (mixers.hybrid) and filled by
    # params.resolve from hybrid_window & co., not declared per mixer
    from linearize.mixers import hybrid

    assert options.read - set(hybrid.OPTION_KEYS) == mixers.get(name).declared_options()


def test_cli_refuses_a_stage_that_does_not_exist_before_loading_the_teacher(monkeypatch, capsys):
    import linearize.teacher

    monkeypatch.setattr(linearize.teacher, "load_teacher", lambda *a, **k: pytest.fail("teacher loaded"))
    bad = max(S.STAGE_NAMES) + 1
    with pytest.raises(SystemExit) as exc:
        S.main(["--arch", "gla", "--stages", str(bad)])
    assert exc.value.code == 2 and f"stages must be some of {sorted(S.STAGE_NAMES)}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stages must be some of"):
        S.run_pipeline(P.resolve("gla"), stages=(bad,))


# --- 11, 12: corpus and teacher folders -----------------------------------------------------
def test_binary_and_latin1_text_files_are_refused_with_their_name(tmp_path):
    from linearize.data import CorpusError, load_documents

    (tmp_path / "good.txt").write_text("plain text, déjà vu\n", encoding="utf-8")
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin.txt is not UTF-8 text .*iconv"):
        load_documents(tmp_path)
    (tmp_path / "latin.txt").unlink()
    (tmp_path / "random.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CorpusError, match=r"random.txt holds NUL bytes: it looks like a binary file"):
        load_documents(tmp_path)
    (tmp_path / "random.txt").unlink()
    assert [d.text for d in load_documents(tmp_path)] == ["plain text, déjà vu\n"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from linearize.data import CorpusError, load_documents

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:3 is not valid JSON"):
        load_documents(path)
    path.write_text('{"text": "one"}\n[1, 2]\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:2 has no 'text' field"):
        load_documents(path)


def test_a_teacher_folder_without_tokenizer_says_so(tmp_path):
    from linearize.teacher import TeacherError, load_teacher

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="has no tokenizer .*save_pretrained"):
        load_teacher(tmp_path)


# --- 8: one process per run folder and per study -------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    from linearize.runfiles import hold_lock
    with hold_lock(sys.argv[1], "run folder " + sys.argv[1], name=sys.argv[2]):
        print("held", flush=True)
        time.sleep(120)
""")


def _hold_in_child(folder, name=".lock"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), name], stdout=subprocess.PIPE, env=env,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(tmp_path, teacher):
    params = _params()
    folder = tmp_path / "softmax" / "t"
    child = _hold_in_child(folder)
    try:
        with pytest.raises(runfiles.RunLockedError, match=rf"in use by process {child.pid} .*Wait for it"):
            S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
        assert not (folder / "params.yaml").exists()
    finally:
        child.kill()  # SIGKILL: the lock file stays behind with a dead PID in it
        child.wait()
    assert (folder / ".lock").exists()
    with RF.Run(params, root=tmp_path).lock():  # a dead holder's lock is taken over
        with RF.Run(params, root=tmp_path).lock():  # and re-entrant within one process
            pass


def test_a_second_study_on_one_outputs_folder_is_refused(tmp_path, monkeypatch, capsys):
    from linearize import runner

    monkeypatch.setattr(runner, "OUTPUTS", tmp_path)
    monkeypatch.setattr(runner, "run_step", lambda *a, **k: pytest.fail("a step ran"))
    child = _hold_in_child(tmp_path, ".study.lock")
    try:
        assert runner.main(["--students", "gla", "--no-bench"]) == 1
        assert f"in use by process {child.pid}" in capsys.readouterr().err
    finally:
        child.kill()
        child.wait()


# --- 1: metrics before a stage's first checkpoint -------------------------------------------
@pytest.mark.parametrize("stage", [1, 3])
def test_a_kill_before_the_first_checkpoint_logs_no_step_twice(stage, teacher, blocks, tmp_path, monkeypatch):
    params = _params()
    ref, _ = _train(stage, teacher, blocks, {**params, "run_name": "ref"}, tmp_path)
    restore = _kill_at_step(monkeypatch, 3)  # steps 1-2 logged, no checkpoint yet (it comes at 3)
    with pytest.raises(KeyboardInterrupt):
        _train(stage, teacher, blocks, params, tmp_path)
    restore()
    sdir = tmp_path / "softmax" / "t" / f"stage{stage}"
    assert not (sdir / "checkpoint.pt").exists() and (sdir / "start.json").exists()
    run, res = _train(stage, teacher, blocks, params, tmp_path)
    assert _steps(run, stage) == _steps(ref, stage)  # each step once, same losses
    assert not (sdir / "start.json").exists()  # a finished stage keeps no resume state


# --- 3: short stages checkpoint too ----------------------------------------------------------
def test_a_stage_shorter_than_checkpoint_every_still_checkpoints(teacher, blocks, tmp_path, monkeypatch):
    assert TR.checkpoint_interval(8, 8) == 4  # cpu-quick stages 1-2: 8 steps, checkpoint_every=8
    assert TR.checkpoint_interval(16, 100) == 16 and TR.checkpoint_interval(3, 1) == 1
    params = _params(stage1_tokens=64 * 8, checkpoint_every=8)
    restore = _kill_at_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        _train(1, teacher, blocks, params, tmp_path)
    restore()
    state = torch.load(tmp_path / "softmax" / "t" / "stage1" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4


# --- 2: temporary files of killed writers ---------------------------------------------------
def test_temp_files_of_dead_processes_are_removed_on_start(tmp_path):
    params = _params()
    sdir = tmp_path / "softmax" / "t" / "stage1"
    sdir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = sdir / f".checkpoint.pt.tmp-{dead.pid}"
    stale.write_bytes(b"x" * 1000)
    alive = sdir / f".checkpoint.pt.tmp-{os.getppid()}"  # a live process's write in progress
    alive.write_bytes(b"y")
    with RF.Run(params, root=tmp_path).lock():
        pass
    assert not stale.exists() and alive.exists()


# --- 4, 5: checksums ---------------------------------------------------------------------------
def _stopped_run(teacher, blocks, tmp_path, stage=2):
    params = _params(stop_after_steps=3)
    _train(stage, teacher, blocks, params, tmp_path)
    ckpt = tmp_path / "softmax" / "t" / f"stage{stage}" / "checkpoint.pt"
    assert ckpt.exists() and runfiles.checksum_path(ckpt).exists()
    return {**params, "stop_after_steps": None}, ckpt


def test_a_truncated_checkpoint_is_refused_naming_file_and_fix(teacher, blocks, tmp_path):
    params, ckpt = _stopped_run(teacher, blocks, tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(runfiles.RunFileError, match=rf"{ckpt} is corrupt \(truncated.*Delete {ckpt} to restart"):
        _train(2, teacher, blocks, params, tmp_path)
    ckpt.write_bytes(b"")
    with pytest.raises(runfiles.RunFileError, match="is corrupt"):
        _train(2, teacher, blocks, params, tmp_path)


def test_flipped_bytes_in_a_checkpoint_are_caught_before_loading(teacher, blocks, tmp_path):
    params, ckpt = _stopped_run(teacher, blocks, tmp_path)
    data = bytearray(ckpt.read_bytes())
    for i in range(20):  # inside the tensor data, where torch.load would not notice
        data[len(data) // 2 + 97 * i] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(runfiles.RunFileError, match=r"is corrupt \(its bytes changed after it was written"):
        _train(2, teacher, blocks, params, tmp_path)
    ckpt.unlink()  # the fix the message names: the stage restarts and matches a clean run
    run, res = _train(2, teacher, blocks, params, tmp_path)
    ref, _ = _train(2, teacher, blocks, {**params, "run_name": "ref"}, tmp_path)
    assert res.finished and _steps(run, 2) == _steps(ref, 2)


def test_a_corrupt_student_is_refused_when_a_later_stage_starts_from_it(teacher, blocks, tmp_path):
    params = _params(stage1_tokens=64 * 2)
    _train(1, teacher, blocks, params, tmp_path)
    student = tmp_path / "softmax" / "t" / "stage1" / "student.pt"
    student.write_bytes(student.read_bytes()[:-10])
    with pytest.raises(runfiles.RunFileError, match=rf"{student} is corrupt.*Delete .*stage1"):
        RF.load_student(RF.Run(params, root=tmp_path), teacher, params, 2)


# --- 6: torn last line of metrics.jsonl -----------------------------------------------------
def test_a_torn_metrics_line_is_dropped_and_cut_before_appending(teacher, blocks, tmp_path, monkeypatch):
    _pipeline_blocks(monkeypatch, blocks)
    params = _params(matrix_mixing=False, h2h=False, stage3_tokens=64 * 6, stop_after_steps=4)
    S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
    run = RF.Run(params, root=tmp_path)
    with open(run.metrics_path, "a") as fh:
        fh.write('{"event": "step", "stage": 3, "st')  # what a full disk leaves
    with pytest.warns(UserWarning, match="dropped the unreadable last line"):
        assert len(run.metrics()) == 1 + 4  # conversion eval + 4 steps
    with pytest.warns(UserWarning, match="cut off a torn last line"):
        S.run_pipeline({**params, "stop_after_steps": None}, teacher=teacher, root=tmp_path, progress=False)
    ref = {**params, "run_name": "ref", "stop_after_steps": None}
    S.run_pipeline(ref, teacher=teacher, root=tmp_path, progress=False)
    assert _steps(run, 3) == _steps(RF.Run(ref, root=tmp_path), 3)
    with open(run.metrics_path, "a") as fh:
        fh.write("not json\n{}\n")
    with pytest.raises(runfiles.RunFileError, match=r"metrics.jsonl:\d+ is not valid JSON"):
        run.metrics()


# --- 7: done.json and student.pt disagree -------------------------------------------------
def test_missing_done_or_student_files_are_errors_not_a_retrain(teacher, blocks, tmp_path, monkeypatch):
    _pipeline_blocks(monkeypatch, blocks)
    params = _params(matrix_mixing=False, h2h=False, stage3_tokens=64 * 2)
    S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
    sdir = tmp_path / "softmax" / "t" / "stage3"
    lines = RF.Run(params, root=tmp_path).metrics_path.read_text()
    done = (sdir / "done.json").read_text()
    (sdir / "done.json").unlink()
    with pytest.raises(RF.RunError, match="student.pt.* but no done.json.*Restore done.json, or delete"):
        S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
    (sdir / "done.json").write_text(done)
    (sdir / "student.pt").rename(sdir / "moved.pt")
    with pytest.raises(RF.RunError, match="says stage 3 finished, but its weights .*student.pt are missing"):
        S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
    assert RF.Run(params, root=tmp_path).metrics_path.read_text() == lines  # no second curve


def test_a_kill_between_student_and_done_resumes(teacher, blocks, tmp_path, monkeypatch):
    # student.pt written, done.json not yet: the stage is still in progress and finishes on rerun
    params = _params(stage2_tokens=64 * 4, checkpoint_every=2)
    ref, ref_res = _train(2, teacher, blocks, {**params, "run_name": "ref"}, tmp_path)
    real = TR.atomic_write_text

    def dies_at_done(path, text):
        if path.name == "done.json":
            raise KeyboardInterrupt("killed before done.json")
        real(path, text)

    monkeypatch.setattr(TR, "atomic_write_text", dies_at_done)
    with pytest.raises(KeyboardInterrupt):
        _train(2, teacher, blocks, params, tmp_path)
    monkeypatch.setattr(TR, "atomic_write_text", real)
    run, res = _train(2, teacher, blocks, params, tmp_path)
    assert res.finished and _steps(run, 2) == _steps(ref, 2)
    for (n, a), b in zip(ref_res.student.state_dict().items(), res.student.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_kill_before_the_throughput_record_does_not_lose_it(teacher, blocks, tmp_path, monkeypatch):
    _pipeline_blocks(monkeypatch, blocks)
    params = _params(matrix_mixing=False, h2h=False, stage3_tokens=64 * 2, measure_teacher_throughput=True)
    real = S.teacher_train_throughput
    monkeypatch.setattr(S, "teacher_train_throughput", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed after done.json, while measuring
        S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
    monkeypatch.setattr(S, "teacher_train_throughput", real)
    S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
    S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)  # reused: not measured again
    events = [m["event"] + str(m.get("after", "")) for m in RF.Run(params, root=tmp_path).metrics()
              if m["event"] != "step"]
    assert events == ["evalconversion", "throughput", "evalstage3"]


# --- 9: a refused rerun leaves params.yaml alone -------------------------------------------
def test_a_refused_rerun_does_not_rewrite_params_yaml(teacher, blocks, tmp_path, monkeypatch):
    import yaml

    _pipeline_blocks(monkeypatch, blocks)
    params = _params(matrix_mixing=False, h2h=False, stage3_tokens=64 * 2)
    S.run_pipeline(params, teacher=teacher, root=tmp_path, progress=False)
    path = tmp_path / "softmax" / "t" / "params.yaml"
    with pytest.raises(RF.RunError, match="stage3_lr"):
        S.run_pipeline({**params, "stage3_lr": 1e-4}, teacher=teacher, root=tmp_path, progress=False)
    assert yaml.safe_load(path.read_text())["stage3_lr"] == params["stage3_lr"]


# --- 12, 13: the runner checks everything before its first step ----------------------------
@pytest.mark.parametrize("argv, message", [
    (["--eval-limit", "abc"], "argument --eval-limit: expected a positive whole number"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["--bench-lengths", "128,x"], "argument --bench-lengths"),
])
def test_runner_refuses_bad_arguments_before_the_first_step(argv, message, monkeypatch, capsys, tmp_path):
    from linearize import runner

    monkeypatch.setattr(runner, "OUTPUTS", tmp_path)
    monkeypatch.setattr(runner, "run_step", lambda *a, **k: pytest.fail("a step ran"))
    with pytest.raises(SystemExit) as exc:
        runner.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_runner_resolves_every_run_it_plans(monkeypatch):
    from linearize import runner

    steps = runner.plan(["gla", "deltanet"], "cpu-quick", grid="all")
    runner.validate_plan(steps)  # the real grid resolves
    monkeypatch.setitem(runner.VARIANTS, "qkv-fit", dict(qkv_copy=True, overrides={"readout_fit_ridge": -1}))
    with pytest.raises(SystemExit, match="01_align.ipynb for cpu-quick-qkv-fit would fail: readout_fit"):
        runner.validate_plan(runner.plan(["gla"], "cpu-quick", grid="fit"))
    with pytest.raises(SystemExit, match="Unknown teacher"):
        runner.validate_plan(runner.plan(["gla"], "cpu-quick", teacher="not a teacher"))


# --- 15: disk full --------------------------------------------------------------------------
def test_disk_full_while_saving_says_so(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    path = tmp_path / "checkpoint.pt"
    runfiles.atomic_save({"step": 1}, path)

    def full(obj, fh, *a, **k):
        fh.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/3: file write failed")

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 << 30, 10 << 30, 4096))
    with pytest.raises(runfiles.DiskFullError, match=rf"disk full while writing {path}: free space"):
        runfiles.atomic_save({"step": 2}, path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="inline_container") as exc:  # not full: not blamed on the disk
        runfiles.atomic_save({"step": 2}, path)
    assert not isinstance(exc.value, runfiles.DiskFullError)

    def enospc(obj, fh, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(runfiles.DiskFullError, match="disk full while writing"):
        runfiles.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}  # the old file is intact and verified
    runfiles.verify(path, "unused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]


def test_checksum_record_accepts_either_file_while_it_is_replaced(tmp_path, monkeypatch):
    # a kill between the record's update and the rename leaves the old file: still valid
    path = tmp_path / "student.pt"
    runfiles.atomic_save({"v": 1}, path)
    real = os.replace

    def dies_before_rename(src, dst):
        if str(dst) == str(path):
            raise KeyboardInterrupt("killed before the rename")
        real(src, dst)

    monkeypatch.setattr(os, "replace", dies_before_rename)
    with pytest.raises(KeyboardInterrupt):
        runfiles.atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert runfiles.load_verified(path, "unused", weights_only=False) == {"v": 1}
    runfiles.atomic_save({"v": 3}, path)
    assert len(json.loads(runfiles.checksum_path(path).read_text())["accepted"]) == 1
