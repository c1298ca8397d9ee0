"""The inference benchmark: byte accounting against real tensors, and an end-to-end CLI run
on a tiny random Llama teacher (and two students when the converter exists) at two lengths."""
import csv
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from linearize import bench

STUDENTS = ["gla", "deltanet"]
HAVE_CONVERTER = importlib.util.find_spec("linearize.convert") is not None
LENGTHS = [16, 32]
STEPS = 3


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random Llama saved as a teacher folder (float32, GQA 4 heads / 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny_teacher")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _real_cache_bytes(cache) -> int:
    # independent of bench.tensor_bytes: element counts of the cache's own K and V tensors
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_kv_cache_formula_matches_dynamic_cache(tiny_llama):
    cfg = tiny_llama.config
    batch, t = 2, 7
    session = bench.Session(tiny_llama)
    with torch.inference_mode():
        session.prefill(torch.randint(0, cfg.vocab_size, (batch, t)))
        assert _real_cache_bytes(session.cache) == bench.kv_cache_bytes(cfg, t, batch, bytes_per_elem=8)
        assert session.state_bytes() == _real_cache_bytes(session.cache)
        assert bench.compact_bytes(session.state()) == _real_cache_bytes(session.cache)
        session.step(torch.randint(0, cfg.vocab_size, (batch, 1)))
    # the cache grows by one position per decode step
    assert session.state_bytes() == bench.kv_cache_bytes(cfg, t + 1, batch, bytes_per_elem=8)
    # 2 * layers 2 * kv heads 2 * head dim 16 * 8 positions * 8 bytes * batch 2
    assert session.state_bytes() == 2 * 2 * 2 * 16 * 8 * 8 * 2


@pytest.mark.skipif(not HAVE_CONVERTER, reason="needs linearize.convert")
def test_student_session_holds_a_constant_mixer_state(tiny_llama):
    from linearize.convert import convert
    from linearize.modeling import MixerCache

    session = bench.Session(convert(tiny_llama, "gla", qkv_copy=True))
    assert isinstance(session.cache, MixerCache)  # the same Session, the student's own cache
    # GLA's state per layer: one [batch 2, heads 4, 16, 16] float64 matrix S, whatever the context
    expected = 2 * 2 * 4 * 16 * 16 * 8
    with torch.inference_mode():
        session.prefill(torch.randint(0, 97, (2, 7)), chunk=3)  # chunks carry the state: 7 tokens seen
        assert session.cache.get_seq_length() == 7
        assert session.state_bytes() == bench.compact_bytes(session.state()) == session.cache.nbytes() == expected
        session.step(torch.randint(0, 97, (2, 1)))
    assert session.state_bytes() == expected


def test_weight_bytes_counts_tied_weights_once(tiny_llama):
    assert tiny_llama.lm_head.weight.data_ptr() == tiny_llama.model.embed_tokens.weight.data_ptr()
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in tiny_llama.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in tiny_llama.buffers())
    assert bench.weight_bytes(tiny_llama) == sum(unique.values()) + buffers
    x = torch.zeros(10, dtype=torch.float64)
    assert bench.tensor_bytes({"a": x, "b": [x[2:5], x.view(2, 5)]}) == 80


def test_teacher_at_its_context_limit_runs_beyond_is_refused(tiny_teacher_dir):
    # a prompt that fills the window (64) is measured; decode steps run just past it
    row = bench.measure_point(bench.TEACHER, 64, teacher=str(tiny_teacher_dir), steps=STEPS, threads=1)
    assert row["state_mib"] * 2**20 == bench.kv_cache_bytes(_tiny_config(tiny_teacher_dir), 64, 1, 4)
    with pytest.raises(bench.BenchError, match="context limit is 64"):
        bench.measure_point(bench.TEACHER, 65, teacher=str(tiny_teacher_dir), steps=STEPS)


# An issue's targets as a benchmark notebook sets them (notebooks/04_benchmark.py): the library
# only checks what it is given.
TARGETS = dict(low=128, high=8192, flat_within=0.10, bytes_share=0.90, state_shrink=20.0)


def _target_row(model, context, tok_s, state_mib, bytes_per_step):
    return dict(model=model, context=context, decode_tok_s=tok_s, state_mib=state_mib,
                bytes_per_step=bytes_per_step, error="")


def test_check_targets_on_hand_made_rows():
    row = _target_row
    rows = [
        row("teacher", 128, 26.0, 5.0, 500), row("teacher", 8192, 14.0, 360.0, 900),
        # flat (24/25 = 0.96), speed ratio 24/14 = 1.71 >= 0.9 * 900/510 = 1.59, 360/1 = 360x
        row("good", 128, 25.0, 1.0, 510), row("good", 8192, 24.0, 1.0, 510),
        # not flat (20/25 = 0.8), speed ratio 20/14 = 1.43 < 1.59, 360/30 = 12x
        row("bad", 128, 25.0, 30.0, 510), row("bad", 8192, 20.0, 30.0, 510),
    ]
    lines = bench.check_targets(rows, **TARGETS)
    good = [line for line in lines if " good:" in line]
    bad = [line for line in lines if " bad:" in line]
    assert len(good) == 3 and all(line.startswith("PASS") for line in good), good
    assert len(bad) == 3 and all(line.startswith("FAIL") for line in bad), bad
    missing = bench.check_targets(rows[:2] + [row("lonely", 128, 25.0, 1.0, 510)], **TARGETS)
    assert missing and all(line.startswith("MISSING") for line in missing)
    # a target left out is not checked: only the flatness lines remain
    flat = bench.check_targets(rows, 128, 8192, flat_within=0.10)
    assert [line.split(":")[0] for line in flat] == ["FAIL bad", "PASS good"]
    assert bench.check_targets(rows, 128, 8192) == []


def test_cli_table_checks_the_targets_it_is_given(tmp_path, capsys):
    rows = [_target_row("teacher", 128, 26.0, 5.0, 500), _target_row("teacher", 8192, 14.0, 360.0, 900),
            _target_row("good", 128, 25.0, 1.0, 510), _target_row("good", 8192, 24.0, 1.0, 510)]
    path = bench.write_csv(rows, tmp_path / "bench.csv")
    assert bench.main(["table", str(path)]) == 0
    assert "PASS" not in capsys.readouterr().out  # no targets given: the table only
    assert bench.main(["table", str(path), "--target-range", "128,8192", "--flat-within", "0.1",
                       "--bytes-share", "0.9", "--state-shrink", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS good:") == 3 and "decode_tok_s" in out
    with pytest.raises(SystemExit):  # a target without the contexts it compares is refused
        bench.main(["table", str(path), "--flat-within", "0.1"])
    assert "--target-range" in capsys.readouterr().err


def _check_csv(path, models, teacher_dir, chunk):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == bench.CSV_COLUMNS
        rows = list(reader)
    assert [(r["model"], int(r["context"])) for r in rows] == [(m, t) for t in LENGTHS for m in models]
    config = _tiny_config(teacher_dir)
    for r in rows:
        assert r["error"] == ""
        assert r["dtype"] == "float32" and r["threads"] == "1" and r["device"] == "cpu"
        num = {k: float(r[k]) for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib", "weights_mib",
                                        "state_mib", "bytes_per_step", "bandwidth_gbs", "roofline_tok_s", "fraction")}
        assert all(math.isfinite(v) and v > 0 for v in num.values()), r
        assert num["bytes_per_step"] == pytest.approx((num["weights_mib"] + num["state_mib"]) * 2**20)
        assert num["roofline_tok_s"] == pytest.approx(num["bandwidth_gbs"] * 1e9 / num["bytes_per_step"])
        assert num["fraction"] == pytest.approx(num["decode_tok_s"] / num["roofline_tok_s"])
        assert num["peak_rss_mib"] > num["weights_mib"]
        assert float(r["state_compact_mib"]) <= num["state_mib"]
        if r["model"] == bench.TEACHER:
            # measured on the real DynamicCache after the prefill: it must match the formula
            assert num["state_mib"] * 2**20 == bench.kv_cache_bytes(config, int(r["context"]), 1, 4)
            assert int(r["prefill_chunk"]) == int(r["context"])  # the teacher prefills in one pass
        else:
            assert int(r["prefill_chunk"]) == chunk
    for s in models[1:]:
        # a recurrent state does not grow with the context (compact bytes: a chunked prefill
        # may leave views of its last chunk in the state, which is the same size at 16 and 32)
        sizes = {float(r["state_compact_mib"]) for r in rows if r["model"] == s}
        assert len(sizes) == 1, (s, sizes)
    return rows


def test_run_in_process_writes_a_well_formed_csv(tiny_teacher_dir, tmp_path):
    """Teacher and two students (when the converter exists) at two lengths, in this process."""
    models = [bench.TEACHER] + (STUDENTS if HAVE_CONVERTER else [])
    out = tmp_path / "bench.csv"
    rows = bench.run(models, LENGTHS, out, teacher=str(tiny_teacher_dir), threads=1, steps=STEPS,
                     prefill_chunk=8, bandwidth_mib=32, isolate=False, log=lambda *_: None)
    assert len(rows) == len(models) * len(LENGTHS)
    _check_csv(out, models, tiny_teacher_dir, chunk=8)
    table = bench.format_table(bench.read_csv(out))
    assert table.count("\n") == len(rows) + 1


@pytest.mark.slow
def test_cli_run_one_fresh_process_per_point(tiny_teacher_dir, tmp_path):
    models = [bench.TEACHER] + (STUDENTS[:1] if HAVE_CONVERTER else [])
    out = tmp_path / "bench.csv"
    cmd = [sys.executable, "-m", "linearize.bench", "run", "--models", ",".join(models),
           "--lengths", ",".join(map(str, LENGTHS)), "--out", str(out), "--teacher", str(tiny_teacher_dir),
           "--steps", str(STEPS), "--bandwidth-mib", "32", "--threads", "1", "--prefill-chunk", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "decode_tok_s" in proc.stdout  # the printed table
    rows = _check_csv(out, models, tiny_teacher_dir, chunk=8)
    # each point ran in its own process: the peak was reset after loading, never the sum of points
    assert all(r["peak_rss_source"] == "VmHWM after load" for r in rows)


def _tiny_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)



def test_decode_side_by_side_interleaves_contexts_and_models(tiny_llama, tmp_path, monkeypatch):
    """Steps go round-robin over every (context, model), so a load change between contexts
    cannot pass for a context effect: each round of single-token steps visits every session
    once. A context past the teacher's limit measures the students alone; the state a student
    carries is the same at every context, the teacher's cache grows with it."""
    from linearize import bench_measure
    from linearize.bench_measure import TEACHER, decode_side_by_side

    folder = tmp_path / "tiny"
    tiny_llama.float().save_pretrained(folder)
    tiny_llama.double()
    visits = []
    step = bench_measure.Session.step

    def recording_step(self, ids):
        if ids.shape[1] == 1:
            visits.append(id(self))
        return step(self, ids)

    monkeypatch.setattr(bench_measure.Session, "step", recording_step)
    steps = 3
    out = decode_side_by_side(["deltanet", "gla"], [8, 32, 300], teacher=str(folder), steps=steps,
                              threads=1, log=lambda *_: None)
    assert set(out["tok_s"]) == {TEACHER, "deltanet", "gla"}
    assert set(out["tok_s"][TEACHER]) == {"8", "32"}  # 300 is past the tiny teacher's 256 positions
    assert set(out["tok_s"]["gla"]) == {"8", "32", "300"}
    pairs = 3 + 3 + 2
    assert len(visits) == pairs * (steps + 2)
    rounds = [visits[r * pairs:(r + 1) * pairs] for r in range(steps + 2)]
    assert all(len(set(r)) == pairs for r in rounds) and all(r == rounds[0] for r in rounds)
    assert out["state_bytes"]["gla"]["8"] == out["state_bytes"]["gla"]["300"]
    assert out["state_bytes"][TEACHER]["32"] > out["state_bytes"][TEACHER]["8"]


@pytest.mark.slow  # inductor compiles the tiny teacher's forward once per context
def test_the_compiled_teacher_decodes_what_the_eager_teacher_decodes(tiny_llama, tmp_path):
    """compile_teacher: the teacher's forward compiled on a StaticCache steps beside the eager one
    and, greedy from the same prompt, produces the same logits (float32 tolerance: inductor
    fuses), at every context up to the teacher's limit and not beyond it."""
    import torch

    from linearize.bench_measure import TEACHER, TEACHER_COMPILED, CompiledTeacherSession, Session, decode_side_by_side

    folder = tmp_path / "tiny"
    tiny_llama.float().save_pretrained(folder)
    tiny_llama.double()
    out = decode_side_by_side(["deltanet"], [8, 300], teacher=str(folder), steps=2, threads=1,
                              log=lambda *_: None, compile_teacher=True)
    assert set(out["tok_s"][TEACHER_COMPILED]) == {"8"} == set(out["tok_s"][TEACHER])
    assert out["compile_teacher"] is True

    net = tiny_llama.float().eval()
    try:
        ids = torch.randint(0, net.config.vocab_size, (1, 6))
        forward = torch.compile(net.forward, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            eager, compiled = Session(net), CompiledTeacherSession(net, 6 + 4, forward)
            a, b = eager.prefill(ids), compiled.prefill(ids)
            for _ in range(4):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
                token = a.argmax(-1, keepdim=True)
                a, b = eager.step(token), compiled.step(token)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    finally:
        tiny_llama.double()


def test_speed_page_keeps_the_compiled_teacher_beside_the_issues_schema(tmp_path):
    """benchmarks/speed.py with --compile-teacher: decode_tok_s keeps the issue's schema (the
    teacher as shipped and the students), the compiled teacher sits in the detail, the page shows
    it as a row and says which students it outpaces, without turning it into a target."""
    import argparse

    from linearize.bench_measure import TEACHER_COMPILED

    speed = _benchmark_module()
    tok_s = {"teacher": {"128": 10.0}, TEACHER_COMPILED: {"128": 12.0}, "gla": {"128": 11.0}, "deltanet": {"128": 13.0}}
    parts = {"decode": {"tok_s": tok_s, "bytes_per_step": {k: {"128": 2**20} for k in tok_s}, "steps": 4,
                        "teacher_limit": 8192, "compile_decode": "model", "compile_teacher": True, "load": [1.0]}}
    args = argparse.Namespace(distill_json=None, eval_json=None, threads=2, repeat=[], notes=None)
    j = speed.build_json(parts, args)
    assert set(j["decode_tok_s"]) == {"teacher", "gla", "deltanet"}
    assert j["detail"]["decode"]["tok_s_teacher_compiled"] == {"128": 12.0}
    lines = speed.targets(j)
    assert "- decode gla >= teacher at every context: PASS" in " ".join(lines)
    assert any(line.startswith("- (beyond the issue) decode gla >= the compiled teacher") and "no, slower at 128" in line
               for line in lines)
    assert any("deltanet >= the compiled teacher at every context: yes" in line for line in lines)
    out = tmp_path / "speed.md"
    speed.write_page(j, args, out)
    assert f"| {TEACHER_COMPILED} | 12.0 |" in out.read_text()


def _benchmark_module(name: str = "speed"):
    """A script of benchmarks/ imported as a module (they are scripts, not a package)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_speed_meter_sees_forwards_of_the_body_and_of_the_whole_model():
    """The shared-context scorer calls the decoder body directly: the meter must count those,
    and a whole-model forward once."""
    meter_mod = _benchmark_module("eval_speed")

    class Body(torch.nn.Module):
        def forward(self, input_ids=None, **kw):
            return input_ids.float()

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Body()

        def forward(self, input_ids=None):
            return self.model(input_ids=input_ids)

    lm = LM()
    meter = meter_mod.ForwardMeter(lm)
    lm.model(input_ids=torch.zeros(2, 5, dtype=torch.long))  # the scorer's plain path
    lm(input_ids=torch.zeros(1, 3, dtype=torch.long))  # its cached path
    tokens, seconds, calls = meter.snapshot()
    assert (tokens, calls) == (13, 2) and seconds >= 0
    meter.close()
    lm.model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert meter.snapshot()[0] == 13


def test_decode_levers_linears_only_applies_every_linear_once():
    """The GEMV-only ceiling reads every linear layer's weights once per step, tied ones once."""
    levers = _benchmark_module("decode_levers")
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied, as the teacher's LM head
    model = torch.nn.ModuleDict({"emb": emb, "a": torch.nn.Linear(8, 16), "b": torch.nn.Linear(16, 8, bias=False),
                                 "norm": torch.nn.LayerNorm(8), "head": head})
    calls = []
    for name in ("a", "b", "head"):
        model[name].register_forward_hook(lambda m, i, o, name=name: calls.append((name, tuple(i[0].shape))))
    only = levers.LinearsOnly(model)
    only.step(None)
    assert calls == [("a", (1, 8)), ("b", (1, 16)), ("head", (1, 8))]
    assert only.bytes == 4 * (8 * 16 + 16 + 16 * 8 + 50 * 8)


def test_speed_page_evaluation_targets_and_carried_parts(tmp_path):
    """The evaluations timed on their own (bf16_eval.py --speed-json) are the target's numbers
    (PASS/FAIL against 10 minutes), the grid's recorded times stay context beside them; a
    decode-only run with --keep-from carries the earlier page's kernels, stage-3 ratio and
    evaluation seconds over with their provenance, and a later render with only the grid keeps
    the timed ones."""
    import argparse
    import json

    speed = _benchmark_module()
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"eval_seconds_6x500": {"teacher (bf16)": 310.0, "deltanet (bf16)": 640.0},
                              "load": {"teacher (bf16)": [0.1, 1.9]}, "eval_source": "bf16_eval.py"}))
    grid = tmp_path / "grid" / "gla" / "cpu-grid-kd"
    grid.mkdir(parents=True)
    (grid / "eval_limit500.json").write_text(json.dumps({"tasks": {str(i): {} for i in range(6)},
                                                         "workers": [0, 1], "wall_time_s": 900.0}))
    parts = {"decode": {"tok_s": {"teacher": {"128": 10.0}, "gla": {"128": 11.0}},
                        "bytes_per_step": {"teacher": {"128": 1}, "gla": {"128": 1}}, "steps": 4,
                        "teacher_limit": 8192, "load": [1.0]}}
    args = argparse.Namespace(distill_json=None, eval_json=str(ev), eval_from_grid=tmp_path / "grid",
                              keep_from=None, threads=2, repeat=[], notes=None)
    j = speed.build_json(parts, args)
    assert list(j["eval_seconds_6x500"]) == ["teacher (bf16)", "deltanet (bf16)", "gla/cpu-grid-kd (2 x 1-thread workers)"]
    lines = " ".join(speed.targets(j))
    assert "evaluation teacher (bf16), six tasks x 500 documents <= 10 minutes: PASS (5.2 minutes)" in lines
    assert "evaluation deltanet (bf16), six tasks x 500 documents <= 10 minutes: FAIL (10.7 minutes)" in lines
    assert "gla/cpu-grid-kd" not in lines  # the grid's times are no target measurement
    page = "\n".join(speed.eval_lines(j))
    assert "timed on their own, seconds: teacher (bf16) 310 (load 0.1 -> 1.9), deltanet (bf16) 640" in page
    assert "inside the study grid, seconds: gla/cpu-grid-kd (2 x 1-thread workers) 900" in page

    # a later render with only the grid: the timed ones stay
    speed.merge_eval(j, None, tmp_path / "grid")
    assert j["detail"]["eval_timed_models"] == ["teacher (bf16)", "deltanet (bf16)"]
    assert j["eval_seconds_6x500"]["deltanet (bf16)"] == 640.0

    # a decode-only run keeping the rest from that page
    j["kernels_over_sdpa_2048"] = {"gla": 1.5}
    j["detail"]["kernels"] = {"T": 2048, "threads": 1, "rounds": 3, "tok_s": {"gla": 3.0}, "sdpa_tok_s": {"gla": 2.0},
                              "load": [1.0]}
    j["distill_over_teacher_fwd_bwd"], j["detail"]["sources"]["distill"] = 0.69, "distill_step.py"
    old = tmp_path / "old.json"
    legacy = json.loads(json.dumps(j))  # as pages before session 18 named the timed evaluations
    legacy["detail"]["eval_measured"] = legacy["detail"].pop("eval_timed_models")
    legacy["detail"]["sources"]["eval_measured"] = legacy["detail"]["sources"].pop("eval_timed")
    old.write_text(json.dumps(legacy))
    args = argparse.Namespace(distill_json=None, eval_json=None, eval_from_grid=None, keep_from=old,
                              threads=2, repeat=[], notes=None)
    new = speed.build_json(parts, args)
    assert new["kernels_over_sdpa_2048"] == {"gla": 1.5} and new["detail"]["kernels"]["commit"] == j["commit"]
    assert new["distill_over_teacher_fwd_bwd"] == 0.69 and new["detail"]["sources"]["distill"] == "distill_step.py"
    assert new["eval_seconds_6x500"] == j["eval_seconds_6x500"]
    assert new["detail"]["eval_timed_models"] == ["teacher (bf16)", "deltanet (bf16)"]
    assert new["detail"]["sources"]["eval_timed"] == "bf16_eval.py"
    # with the grid renewed too: the carried timed evaluations stay, the grid's are read again
    (grid / "eval_limit500.json").write_text(json.dumps({"tasks": {str(i): {} for i in range(6)},
                                                         "workers": [0, 1], "wall_time_s": 800.0}))
    args.eval_from_grid = tmp_path / "grid"
    renewed = speed.build_json(parts, args)
    assert renewed["eval_seconds_6x500"] == {"teacher (bf16)": 310.0, "deltanet (bf16)": 640.0,
                                             "gla/cpu-grid-kd (2 x 1-thread workers)": 800.0}
    speed.write_page(new, args, tmp_path / "speed.md")
    assert "Measured apart from the rest of the page" in (tmp_path / "speed.md").read_text()


def test_bf16_eval_speed_json_gathers_models_with_how_they_ran(tmp_path):
    """benchmarks/bf16_eval.py --speed-json: each run adds its wall seconds under a key naming the
    model, the precision and the workers as evaluate_tasks splits them (threads // workers each),
    so one file gathers the teacher and students for speed.py --eval-json."""
    import argparse
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_eval.py"
    spec = importlib.util.spec_from_file_location("bf16_eval", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "eval.json"
    times = {"bfloat16": {"wall_s": 301.24, "cpu_s": 590.0, "load_start": 0.2, "load_end": 1.9}}
    args = argparse.Namespace(json=None, speed_json=out, workers=2, threads=2, tasks="lambada_openai,winogrande,arc_easy,"
                              "arc_challenge,piqa,hellaswag")
    mod.finish({"model": "teacher", "times": times}, args)
    args.workers, args.threads = 1, 2
    mod.finish({"model": "deltanet (fresh conversion)", "times": {"float32": dict(times["bfloat16"], wall_s=700.0)}}, args)
    book = json.loads(out.read_text())
    assert book["eval_seconds_6x500"] == {"teacher (bf16, linear weights cast once, 2 x 1-thread workers)": 301.2,
                                          "deltanet (fresh conversion) (float32, 1 process, 2 threads)": 700.0}
    assert book["load"]["teacher (bf16, linear weights cast once, 2 x 1-thread workers)"] == [0.2, 1.9]
    with __import__("pytest").raises(SystemExit, match="--limit 500"):
        mod.main(["--limit", "80", "--speed-json", str(out)])


def test_param_table_writes_a_json_twin_that_matches_its_page(tmp_path):
    """docs/students.md and docs/students.json come from one table; the counts are the models' own."""
    import json

    from linearize.mixers import available
    from linearize.teacher import load_teacher

    param_table = _benchmark_module("param_table")
    assert param_table.main(["--out", str(tmp_path / "students.md")]) == 0
    data = json.loads((tmp_path / "students.json").read_text())
    page = (tmp_path / "students.md").read_text()
    teacher, _ = load_teacher(None)
    assert data["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert data["students"]["softmax"]["params"] == data["teacher"]["params"]  # softmax is the teacher's layout
    assert list(data["students"]) == available()
    for name, r in data["students"].items():
        assert f"| {name} | {r['family']} |" in page and f"| {r['params'] / 1e6:.2f}M | {r['growth']:.3f} |" in page


def test_teacher_eval_twin_holds_the_pages_numbers(tmp_path):
    """teacher_eval.py writes docs/teacher_eval.md and its JSON twin from the same results."""
    import argparse
    import json

    teacher_eval = _benchmark_module("teacher_eval")
    merged = {"lm_eval_version": "0.4.x", "dtype": "float32", "device": "cpu", "model": "t",
              "tasks": {"piqa": {"n_docs": 500, "acc": 0.652, "acc_stderr": 0.0213, "acc_norm": 0.66,
                                 "acc_norm_stderr": 0.021, "per_doc": {"acc": [1] * 326 + [0] * 174}}}}
    args = argparse.Namespace(out=tmp_path / "teacher_eval.md", limit=500, batch_size=8, threads=1)
    teacher_eval.write_report("t", merged, {"piqa": 61.4}, args, "CMD", "start", None)
    page = args.out.read_text()
    data = json.loads(args.out.with_suffix(".json").read_text())
    row = data["tasks"]["piqa"]
    assert row["acc"] == pytest.approx(65.2) and row["acc_first500"] == pytest.approx(65.2)
    assert f"| piqa | 500/{row['official_docs']} | {row['acc']:.2f} | {row['acc_stderr']:.2f} |" in page
    assert data["command"] == "CMD" and data["finished"] is None and "INCOMPLETE" in page
