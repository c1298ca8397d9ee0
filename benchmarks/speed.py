"""Speed page generator (issue 14): writes docs/speed.md and its twin docs/speed.json together.

Measures, each part in a child process with a time limit (so one hung part loses only itself):
* bandwidth  memory read bandwidth, best of several 512 MiB reads, with its spread
             (``linearize.bench.measure_bandwidth``);
* decode     decode tokens/s of the teacher and students at each context, teacher and students
             in one process with their steps interleaved (``linearize.bench.decode_side_by_side``),
             so the ratios survive a loaded machine; roofline = bandwidth / (weights + state bytes);
* kernels    fwd+bwd tokens/s of every mixer's chunked ``core`` at T=2048 (SmolLM2-135M's
             attention shapes, as benchmarks/mixers.py), each interleaved round by round with the
             softmax mixer (sdpa), reported as a ratio over sdpa.
Distillation and evaluation throughput are measured elsewhere: pass their JSON with
--distill-json (benchmarks/distill_step.py --speed-json) and --eval-json (benchmarks/bf16_eval.py
--speed-json, each model's six tasks timed on its own), and --eval-from-grid for the evaluation
times the study grid recorded; --keep-from docs/speed.json carries over from the earlier page
whatever this run does not measure. Without any of them the fields are null and the page says
"not measured in this run".

Run (nice'd; a few minutes on an idle 2-core machine, longer under load):
    nice -n 10 .venv/bin/python benchmarks/speed.py
    nice -n 10 .venv/bin/python benchmarks/speed.py --quick        # 2 contexts, 3 mixers: a look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from linearize.bench_measure import TEACHER_COMPILED  # the compiled teacher's row (--compile-teacher)
from linearize.decode import COMPILED_STEPS  # --compile-decode's names

ROOT = Path(__file__).resolve().parents[1]
TAG = "SPEED_PART "
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 576, 9, 3, 64  # SmolLM2-135M's attention shapes
CONTEXTS = [128, 512, 2048, 8192, 16384]
STUDENTS = ["gla", "xlstm", "deltanet", "mamba2"]
TARGET_ROOFLINE = 0.70
# Passes and steps are timed in this process's CPU seconds (time.process_time, all its threads):
# on a machine loaded 5-8x over its cores, wall time mostly measures waiting for a core, and
# ratios of wall times swung 0.5-2x between identical runs. CPU time counts the work done; with
# more than one thread it is the sum over threads (so it does not credit parallel speed-up).
CLOCK = time.process_time
TARGET_FLAT = 0.10


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _compiled_words(how) -> str:
    """The decode table's sentence on how the students stepped (JSON's compile_decode: False,
    True as on pages before "model" existed, or a name of linearize.decode.COMPILED_STEPS)."""
    if not how:
        return "Every model runs eager."
    what = {True: "the layer step compiled by inductor, one graph shared by every layer",
            "layer": "the layer step compiled by inductor, one graph shared by every layer",
            "model": "every layer's step compiled by inductor as one graph",
            "frozen": "every layer's step compiled by inductor as one graph, the weights frozen into it "
                      "as constants (oneDNN-prepacked linear layers)"}[how]
    return (f"Students decode through `linearize.decode.compile_decode` ({what}; the first, compiling "
            "step is excluded and its wall time is in the JSON's `first_step_s`); the teacher runs eager, "
            "as transformers ships it.")


# ------------------------------------------------------------------------------ parts (children)
def part_bandwidth(args) -> dict:
    from linearize.bench import measure_bandwidth

    return measure_bandwidth("cpu", args.threads, mib=512, repeats=9, clock=CLOCK)


def part_decode(args) -> dict:
    from linearize.bench import decode_side_by_side

    return decode_side_by_side(args.students, args.contexts, steps=args.steps, threads=args.threads,
                               log=lambda m: print(m, file=sys.stderr, flush=True), clock=CLOCK,
                               compile_decode=args.compile_decode, compile_teacher=args.compile_teacher)


def part_kernels(args) -> dict:
    """Best fwd+bwd seconds of each mixer's chunked core and of softmax (sdpa) beside it."""
    import torch

    from linearize.mixers import MixerConfig, build

    torch.set_num_threads(args.threads)
    t = args.kernel_t
    inv = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    emb = torch.cat([torch.arange(t).float()[:, None] * inv] * 2, -1)[None]
    pe = (emb.cos(), emb.sin())

    def make(name):
        torch.manual_seed(0)
        m = build(name, MixerConfig(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, chunk_size=64, backend="torch")).float()
        x = torch.randn(1, t, HIDDEN, requires_grad=True)

        def one():
            m.zero_grad(set_to_none=True)
            x.grad = None
            t0 = CLOCK()
            m.core(x, pe, mode="chunk").o.square().mean().backward()
            return CLOCK() - t0
        return one

    sdpa = make("softmax")
    out = {"T": t, "threads": args.threads, "rounds": args.kernel_rounds, "sdpa_tok_s": {}, "tok_s": {}, "ratio": {}}
    for name in args.mixers:
        mixer = sdpa if name == "softmax" else make(name)
        best_s, best_m = float("inf"), float("inf")
        for _ in range(args.kernel_rounds):  # interleaved: sdpa, mixer, sdpa, mixer ...
            best_s = min(best_s, sdpa())
            best_m = min(best_m, mixer())
        out["sdpa_tok_s"][name], out["tok_s"][name] = t / best_s, t / best_m
        out["ratio"][name] = best_s / best_m
        print(f"{name}: {t / best_m:.0f} tok/s, sdpa beside it {t / best_s:.0f} tok/s, ratio "
              f"{best_s / best_m:.2f} (load {loadavg():.1f})", file=sys.stderr, flush=True)
    return out


PARTS = {"bandwidth": part_bandwidth, "decode": part_decode, "kernels": part_kernels}


def run_part(name: str, argv: list[str], timeout: float) -> dict:
    """Run one part in a child; its result, or {"error": why}."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, *argv, "--part", name]
    load0, t0 = loadavg(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    tail: list[str] = []

    def relay():  # the child's progress shows as it comes (a decode sweep runs for many minutes)
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail[:] = (tail + [line.rstrip()])[-3:]

    out: list[str] = []
    # one reader per pipe; not communicate(), which would read stderr too and take lines from relay
    readers = [threading.Thread(target=relay, daemon=True),
               threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)]
    for r in readers:
        r.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"error": f"timed out after {timeout:.0f} s (raise --timeout, or measure fewer points)"}
    for r in readers:
        r.join()
    stdout = "".join(out)
    for line in reversed(stdout.splitlines()):
        if line.startswith(TAG):
            res = json.loads(line[len(TAG):])
            res["seconds"] = time.perf_counter() - t0
            res["load"] = [load0, loadavg()]
            return res
    return {"error": f"exited {proc.returncode}: " + " | ".join(tail)}


# ------------------------------------------------------------------------------ page
def read_external(path: str | None, key: str):
    """A number or mapping from another benchmark's JSON: the file's ``key`` field, or the
    whole file if it is the bare value. None when no path is given."""
    if not path:
        return None
    data = json.loads(Path(path).read_text())
    return data.get(key, data) if isinstance(data, dict) and key in data else data


def _source_of(path: str | None, key: str) -> str | None:
    """Where another benchmark's numbers come from: its JSON's ``key`` field, if it has one
    (read_external would return the whole file for a missing key)."""
    if not path:
        return None
    data = json.loads(Path(path).read_text())
    return data.get(key) if isinstance(data, dict) else None


def eval_from_grid(root: Path) -> dict:
    """``eval_seconds_6x500`` and its source from a grid's records (``runner --snapshot``): the wall
    time each 500-document evaluation of all six tasks took inside the grid, labelled with how it
    ran (one process, or the tasks split over single-thread workers)."""
    out = {}
    for path in sorted(Path(root).glob("**/eval_limit500.json")):
        res = json.loads(path.read_text())
        if len(res.get("tasks", {})) != 6:
            continue
        rel = path.parent.relative_to(root)
        how = (f"{len(res['workers'])} x 1-thread workers" if res.get("workers") else "1 process, 2 threads")
        out[f"{rel} ({how})"] = res["wall_time_s"]
    return {"eval_seconds_6x500": out, "eval_source": (
        f"wall times inside the study grid ({root}), on a machine shared with other jobs "
        "(load 3-5; the teacher's under swap): upper bounds")}


TARGET_EVAL_S = 600  # the six tasks at 500 documents each in <= 10 minutes


def merge_eval(j: dict, eval_json: str | None = None, grid: Path | None = None) -> None:
    """Fill ``eval_seconds_6x500``: the evaluations timed on their own (``eval_json``, from
    ``benchmarks/bf16_eval.py --speed-json``: the target's measurement) first, then those the study
    grid recorded (``grid``, a --snapshot folder: wall times on a shared machine, context only).
    Which keys are which is kept in ``detail.eval_timed_models``; each source in ``detail.sources``."""
    d = j["detail"].setdefault("sources", {})
    if eval_json:
        measured = read_external(eval_json, "eval_seconds_6x500")
        if not isinstance(measured, dict):
            raise SystemExit(f"{eval_json}: no eval_seconds_6x500 mapping (write it with bf16_eval.py --speed-json)")
        d["eval_timed"] = _source_of(eval_json, "eval_source")
        j["detail"]["eval_load"] = (json.loads(Path(eval_json).read_text()).get("load") or {})
    else:  # keep the page's own timed evaluations when only the grid's are renewed
        prior = j.get("eval_seconds_6x500") or {}
        measured = {k: prior[k] for k in j["detail"].get("eval_timed_models", []) if k in prior}
    j["detail"]["eval_timed_models"] = list(measured)
    seconds = dict(measured)
    if grid:
        ev = eval_from_grid(grid)
        seconds.update(ev["eval_seconds_6x500"])
        d["eval"] = ev["eval_source"]
    if seconds:
        j["eval_seconds_6x500"] = seconds


def build_json(parts: dict, args) -> dict:
    bw, dec, ker = parts.get("bandwidth", {}), parts.get("decode", {}), parts.get("kernels", {})
    roof = {}
    if "read_gbs" in bw and "tok_s" in dec:
        for name, per_ctx in dec["tok_s"].items():
            if name != "teacher" and "8192" in per_ctx:
                roof[name] = per_ctx["8192"] / (bw["read_gbs"] * 1e9 / dec["bytes_per_step"][name]["8192"])
    loads = [x for p in parts.values() for x in p.get("load", [])]
    j = {
        "distill_over_teacher_fwd_bwd": read_external(args.distill_json, "distill_over_teacher_fwd_bwd"),
        "eval_seconds_6x500": None,  # merge_eval, below
        # the schema: the teacher as transformers ships it and the students; the compiled
        # teacher (--compile-teacher) is kept beside them in detail.decode.tok_s_teacher_compiled
        "decode_tok_s": {k: v for k, v in dec["tok_s"].items() if k != TEACHER_COMPILED} if "tok_s" in dec else None,
        "roofline_fraction_8192": roof or None,
        "kernels_over_sdpa_2048": ker.get("ratio"),
        "load_average": statistics.mean(loads) if loads else loadavg(),
        "commit": commit(),
        # detail behind the fields
        "detail": {"bandwidth": bw, "decode": {**{k: v for k, v in dec.items() if k != "tok_s"},
                                               **({"tok_s_teacher_compiled": dec["tok_s"][TEACHER_COMPILED]}
                                                  if TEACHER_COMPILED in dec.get("tok_s", {}) else {})},
                   "kernels": {k: v for k, v in ker.items() if k != "ratio"},
                   "load_samples": loads, "threads": args.threads, "repeat": args.repeat,
                   "sources": {"distill": _source_of(args.distill_json, "source")},
                   "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "errors": {n: p["error"] for n, p in parts.items() if "error" in p}},
    }
    if getattr(args, "keep_from", None):  # first, so that newer evaluation seconds below replace its
        keep_from(j, upgrade(json.loads(Path(args.keep_from).read_text())))
    if args.eval_json or getattr(args, "eval_from_grid", None):
        merge_eval(j, args.eval_json, getattr(args, "eval_from_grid", None))
    return j


def upgrade(j: dict) -> dict:
    """A speed.json written before 2026-12-04 named both the list of timed evaluations and their
    source ``eval_measured``; give them today's names (``detail.eval_timed_models``,
    ``detail.sources.eval_timed``) so that older pages render and carry over."""
    d = j.get("detail") or {}
    if "eval_measured" in d:
        d["eval_timed_models"] = d.pop("eval_measured")
    src = d.get("sources") or {}
    if "eval_measured" in src:
        src["eval_timed"] = src.pop("eval_measured")
    return j


def keep_from(j: dict, old: dict) -> None:
    """Carry over from an earlier speed.json what this run did not measure (the kernels, the
    stage-3 ratio, the evaluation seconds), each with the provenance it was measured under, so
    a decode-only run does not blank the rest of the page."""
    d, od = j["detail"], old["detail"]
    if j["kernels_over_sdpa_2048"] is None and old.get("kernels_over_sdpa_2048"):
        j["kernels_over_sdpa_2048"] = old["kernels_over_sdpa_2048"]
        ker = dict(od["kernels"])
        if "commit" not in ker:  # measured with the old page's other parts: it shares their provenance
            ker.update(commit=old["commit"], generated=od["generated"], load_samples=od["load_samples"],
                       repeat=od.get("repeat", []), threads=od["threads"])
        d["kernels"] = ker
    if j["distill_over_teacher_fwd_bwd"] is None and old.get("distill_over_teacher_fwd_bwd") is not None:
        j["distill_over_teacher_fwd_bwd"] = old["distill_over_teacher_fwd_bwd"]
        d["sources"]["distill"] = (od.get("sources") or {}).get("distill")
    if j["eval_seconds_6x500"] is None and old.get("eval_seconds_6x500"):
        j["eval_seconds_6x500"] = old["eval_seconds_6x500"]
        for key in ("eval", "eval_timed"):
            if (od.get("sources") or {}).get(key):
                d["sources"][key] = od["sources"][key]
        for key in ("eval_timed_models", "eval_load"):
            if key in od:
                d[key] = od[key]


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def targets(j: dict) -> list[str]:
    lines = []
    dec = j["decode_tok_s"] or {}
    teacher = dec.get("teacher", {})
    top, limit = max(map(int, teacher), default=0), j["detail"]["decode"].get("teacher_limit")
    for name, per_ctx in dec.items():
        if name == "teacher":
            continue
        slower = [c for c in per_ctx if c in teacher and per_ctx[c] < teacher[c]]
        lines.append(f"- decode {name} >= teacher at every context: "
                     + ("PASS" if not slower else f"FAIL at {', '.join(slower)}")
                     + f" (teacher measured up to {top}{', its context limit' if top == limit else ''})")
        v = list(per_ctx.values())
        flat = min(v) / max(v)
        lines.append(f"- decode {name} flat within {TARGET_FLAT:.0%} over {', '.join(per_ctx)}: "
                     f"{'PASS' if flat >= 1 - TARGET_FLAT else 'FAIL'} (slowest/fastest {flat:.2f})")
    compiled = j["detail"]["decode"].get("tok_s_teacher_compiled")
    for name, per_ctx in dec.items() if compiled else ():
        if name != "teacher":
            slower = [c for c in per_ctx if c in compiled and per_ctx[c] < compiled[c]]
            lines.append(f"- (beyond the issue) decode {name} >= the compiled teacher at every context: "
                         + ("yes" if not slower else f"no, slower at {', '.join(slower)}"))
    for name, frac in (j["roofline_fraction_8192"] or {}).items():
        lines.append(f"- roofline {name} at 8192 >= {TARGET_ROOFLINE:.0%}: "
                     f"{'PASS' if frac >= TARGET_ROOFLINE else 'FAIL'} ({frac:.0%})")
    for name in j["detail"].get("eval_timed_models", []):
        sec = j["eval_seconds_6x500"][name]
        lines.append(f"- evaluation {name}, six tasks x 500 documents <= {TARGET_EVAL_S // 60} minutes: "
                     f"{'PASS' if sec <= TARGET_EVAL_S else 'FAIL'} ({sec / 60:.1f} minutes)")
    for name, r in (j["kernels_over_sdpa_2048"] or {}).items():
        if name != "softmax":
            lines.append(f"- kernel {name} fwd+bwd >= sdpa at 2048: {'PASS' if r >= 1 else 'FAIL'} ({r:.2f}x)")
    return lines


def eval_lines(j: dict) -> list[str]:
    """The page's evaluation bullets: the evaluations timed on their own, then the grid's."""
    ev, d = j["eval_seconds_6x500"], j["detail"]
    if not isinstance(ev, dict):
        return ["- six tasks at 500 documents, seconds: not measured in this run (--eval-json)"]
    sources, measured, load = d.get("sources") or {}, d.get("eval_timed_models", []), d.get("eval_load", {})
    out = []
    if measured:
        out.append("- six tasks at 500 documents, timed on their own, seconds: " + ", ".join(
            f"{k} {ev[k]:.0f}" + (f" (load {load[k][0]:.1f} -> {load[k][1]:.1f})" if k in load else "")
            for k in measured) + (f" ({sources['eval_timed']})" if sources.get("eval_timed") else ""))
    rest = [k for k in ev if k not in measured]
    if rest:
        out.append("- six tasks at 500 documents" + (", inside the study grid" if measured else "") + ", seconds: "
                   + ", ".join(f"{k} {ev[k]:.0f}" for k in rest)
                   + (f" ({sources['eval']})" if sources.get("eval") else ""))
    return out


def write_page(j: dict, args, out_md: Path) -> None:
    d = j["detail"]
    bw, ker = d["bandwidth"], d["kernels"]
    L = ["# Speed on the CPU (issue 14)", "",
         "Generated by `benchmarks/speed.py` together with `docs/speed.json`; do not edit by hand. Repeat:", "",
         "```", f"nice -n 10 .venv/bin/python benchmarks/speed.py {' '.join(d.get('repeat', []))}".rstrip(),
         "# with the other helpers' numbers:",
         "nice -n 10 .venv/bin/python benchmarks/speed.py --distill-json DISTILL.json --eval-json EVAL.json",
         "# the evaluation seconds (EVAL.json), each model timed on its own on a quiet machine",
         "# (float32; bfloat16 pays only on a CPU with AMX):",
         "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bf16_eval.py --limit 500 --threads 2 --workers 2 "
         "--precisions float32 "
         "--speed-json EVAL.json [--student deltanet]",
         "# the stage-3 ratio (DISTILL.json) from the distillation-step profile:",
         "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_step.py --arch deltanet --speed-json DISTILL.json",
         "# this page again from its JSON, with the evaluation seconds the study grid recorded:",
         ".venv/bin/python benchmarks/speed.py --render docs/speed.json --eval-from-grid results/cpu-grid", "```", "",
         f"Commit `{j['commit']}`, {d['generated']}, {d['threads']} threads, float32. Load average "
         f"{j['load_average']:.1f} (1-minute, sampled before and after each part: "
         f"{', '.join(f'{x:.1f}' for x in d['load_samples'])}) on a 2-core machine shared with other "
         "jobs. Passes and steps are timed in the process's CPU seconds (`time.process_time`), which count "
         "the work done rather than the wait for a core; ratios are measured side by side in one process "
         "(interleaved steps or passes) and are the numbers to read.", ""]
    if d["errors"]:
        L += ["**Parts that failed in this run:** " + "; ".join(f"{k}: {v}" for k, v in d["errors"].items()), ""]
    sources = d.get("sources") or {}
    L += ["## Distillation and evaluation", "",
          f"- distill / teacher fwd+bwd tokens/s: {fmt(j['distill_over_teacher_fwd_bwd'])}"
          + ("" if j["distill_over_teacher_fwd_bwd"] is not None else " (not measured in this run; --distill-json)")
          + (f" ({sources['distill']})" if sources.get("distill") else ""),
          *eval_lines(j), ""]
    if "read_gbs" in bw:  # not when the part failed (its error is listed above)
        L += ["## Memory bandwidth", "",
              f"Read: best {bw['read_gbs']:.1f} GB/s of {bw['repeats']} reads of {bw['mib']} MiB "
              f"(median {bw['read_gbs_median']:.1f}, slowest {bw['read_gbs_min']:.1f}); copy best "
              f"{bw['copy_gbs']:.1f} GB/s. The best read is the roofline's bandwidth: every slower read "
              "also measured other processes' traffic.", ""]
    dec = j["decode_tok_s"]
    if dec:
        ctxs = sorted({c for v in dec.values() for c in v}, key=int)
        bps = d["decode"]["bytes_per_step"]
        L += ["## Decode", "",
              f"Tokens/s = 1 / median CPU seconds of {d['decode']['steps']} greedy steps after a prefill of random tokens "
              "(teacher: DynamicCache, sdpa; students: their recurrent state), all models' steps interleaved "
              "in one process. Teacher limit: "
              f"{d['decode']['teacher_limit']} positions. "
              + _compiled_words(d["decode"].get("compile_decode"))
              + (f" The row `{TEACHER_COMPILED}` is the same teacher with its forward compiled by inductor "
                 "on a transformers StaticCache (fullgraph, static shapes, one graph per context), stepped in "
                 "the same rounds: the issue's targets compare the students with the teacher as transformers "
                 "ships it, and this row shows what compiling the teacher as well gives."
                 if d["decode"].get("tok_s_teacher_compiled") else ""), "",
              "| model | " + " | ".join(ctxs) + " | MiB moved/step at 8192 |",
              "|---|" + "---|" * (len(ctxs) + 1)]
        rows = dict(dec)
        if d["decode"].get("tok_s_teacher_compiled"):
            rows = {"teacher": dec["teacher"], TEACHER_COMPILED: d["decode"]["tok_s_teacher_compiled"],
                    **{k: v for k, v in dec.items() if k != "teacher"}}
        for name, per_ctx in rows.items():
            mib = bps.get(name, {}).get("8192")
            L.append(f"| {name} | " + " | ".join(fmt(per_ctx.get(c), ".1f") for c in ctxs)
                     + f" | {fmt(mib / 2**20 if mib else None, '.0f')} |")
        if j["roofline_fraction_8192"]:
            L += ["", "Roofline at 8192 (decode tok/s over best read bandwidth / (weights + state bytes)): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in j["roofline_fraction_8192"].items()) + "."]
        L.append("")
    if j["kernels_over_sdpa_2048"]:
        L += ["## Training kernels", "",
              f"Forward+backward of each mixer's `core` as training runs it (projections + kernel, B=1, T={ker['T']}, "
              "H=9/3, head dim 64, float32: the chunked kernel, or for ReBased its stateless strip form up to "
              "4096 tokens), best of "
              f"{ker['rounds']} passes in CPU seconds, each round beside a pass of the softmax mixer (sdpa); softmax's own "
              "row (sdpa over sdpa) shows the noise."
              + (f" Measured apart from the rest of the page: commit `{ker['commit']}`, {ker['generated']}, "
                 f"{ker['threads']} thread(s), load {', '.join(f'{x:.1f}' for x in ker['load_samples'])}; repeat with "
                 f"`benchmarks/speed.py {' '.join(ker['repeat'])}` then `--render docs/speed.json --kernels-json OUT.json`."
                 if "commit" in ker else ""), "",
              "| mixer | tok/s | sdpa tok/s beside it | over sdpa |", "|---|---|---|---|"]
        for name, r in j["kernels_over_sdpa_2048"].items():
            L.append(f"| {name} | {ker['tok_s'][name]:.0f} | {ker['sdpa_tok_s'][name]:.0f} | {r:.2f} |")
        L.append("")
    L += ["## Targets", ""] + targets(j) + [""]
    if args.notes and Path(args.notes).exists():
        L += [Path(args.notes).read_text().rstrip(), ""]
    out_md.write_text("\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "speed", help="writes OUT.md and OUT.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--students", default=",".join(STUDENTS))
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--compile-decode", nargs="?", const="layer", default=False, choices=tuple(COMPILED_STEPS),
                    help="students decode through linearize.decode.compile_decode (inductor): 'layer' (the "
                         "flag alone) compiles one layer's step, 'model' every layer as one graph, 'frozen' the "
                         "same with the weights as constants; compile time logged")
    ap.add_argument("--compile-teacher", action="store_true",
                    help="decode: also the teacher's forward compiled on a StaticCache (transformers' route to "
                         "torch.compile), as a row of its own beside the eager teacher")
    ap.add_argument("--mixers", default="", help="kernels: comma list (default: all ten)")
    ap.add_argument("--kernel-t", type=int, default=2048)
    ap.add_argument("--kernel-rounds", type=int, default=2)
    ap.add_argument("--parts", default="bandwidth,kernels,decode")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per part")
    ap.add_argument("--distill-json", default=None)
    ap.add_argument("--eval-json", default=None)
    ap.add_argument("--kernels-json", default=None, metavar="JSON",
                    help="with --render: the kernels from a newer run's speed.json (--parts kernels)")
    ap.add_argument("--eval-from-grid", type=Path, default=None, metavar="DIR",
                    help="the evaluation seconds the study grid recorded (results/cpu-grid), after --eval-json's")
    ap.add_argument("--keep-from", type=Path, default=None, metavar="JSON",
                    help="carry over from this earlier speed.json the parts this run does not measure "
                         "(kernels, the stage-3 ratio, evaluation seconds), with their provenance")
    ap.add_argument("--notes", default=str(ROOT / "docs" / "speed_notes.md"),
                    help="hand-written analysis appended to the page (kept in its own file)")
    ap.add_argument("--quick", action="store_true", help="contexts 128,2048; mixers softmax,gla,rebased")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="measure nothing: write the page again from this speed.json (e.g. after editing the notes)")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if args.quick:
        args.contexts, args.mixers = "128,2048", args.mixers or "softmax,gla,rebased"
    args.students = [s for s in args.students.split(",") if s]
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    from_registry = not args.mixers
    if args.part:
        if from_registry:
            from linearize.mixers import available

            args.mixers = available()
        else:
            args.mixers = [m for m in args.mixers.split(",") if m]
        print(TAG + json.dumps(PARTS[args.part](args)), flush=True)
        return 0
    if args.render:
        j = upgrade(json.loads(args.render.read_text()))
        if args.distill_json:  # a newer stage-3 measurement (benchmarks/distill_step.py --speed-json)
            j["distill_over_teacher_fwd_bwd"] = read_external(args.distill_json, "distill_over_teacher_fwd_bwd")
            j["detail"].setdefault("sources", {})["distill"] = _source_of(args.distill_json, "source")
        if args.kernels_json:  # a newer kernels-only run (speed.py --parts kernels --out ...)
            k = json.loads(Path(args.kernels_json).read_text())
            j["kernels_over_sdpa_2048"] = k["kernels_over_sdpa_2048"]
            j["detail"]["kernels"] = dict(k["detail"]["kernels"], commit=k["commit"],
                                          generated=k["detail"]["generated"],
                                          load_samples=k["detail"]["load_samples"],
                                          repeat=k["detail"].get("repeat", []))
        if args.eval_json or args.eval_from_grid:  # newer evaluation seconds replace the page's
            merge_eval(j, args.eval_json, args.eval_from_grid)
        write_page(j, args, args.out.with_suffix(".md"))
        # always: --distill-json / --eval-from-grid may have changed it, and the twins must agree
        args.out.with_suffix(".json").write_text(json.dumps(j, indent=1) + "\n")
        print(f"wrote {args.out.with_suffix('.md')} from {args.render}")
        return 0
    args.repeat, skip = [], False
    for a in raw:  # the command that repeats this page, less the other benchmarks' files and --out
        if skip or a.startswith(("--distill-json", "--eval-json", "--out")):
            skip = not skip and "=" not in a
            continue
        args.repeat.append(a)
    parts = {}
    for name in [p for p in args.parts.split(",") if p]:
        print(f"== {name} (load {loadavg():.1f})", file=sys.stderr, flush=True)
        parts[name] = run_part(name, raw, args.timeout)
    j = build_json(parts, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(j, indent=1) + "\n")
    write_page(j, args, args.out.with_suffix(".md"))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 1 if j["detail"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
