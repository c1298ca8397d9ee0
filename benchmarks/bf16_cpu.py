"""Does bf16 autocast pay on this CPU? The teacher's forward and forward+backward, float32 against
``torch.autocast("cpu", dtype=torch.bfloat16)``, interleaved round by round in one process and
timed in CPU seconds (so a loaded machine hits both alike). Prints tokens/s and the ratio with the
load average. Issue 13 asks to measure bf16 before using it in stage 3: on a CPU without bf16
matrix instructions (AVX2 only) the autocast's conversions cost more than the halved bytes save.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bf16_cpu.py [--threads 1] [--shape 4x128]
    ... --students all [--json /tmp/bf16_students.json]   # forward speed and drift of each student
    ... --cast-once teacher,deltanet --shape 8x128   # bf16 forward, weights cast per call vs once

With ``--cast-once``: the bf16 autocast forward (no grad, evaluation's shape) of the teacher and of
fresh QKV-copied students, with autocast casting every linear weight on every call against the
weights cast once beforehand (``linearize.evaluate.linear_weights_in``, what evaluation does
under ``autocast="bfloat16"``), interleaved round by round, CPU seconds.

With ``--students``: the teacher and each student, forward only on validation blocks of the mixed
corpus, float32 against bf16 autocast: the speed ratio (CPU seconds, interleaved) and the drift
of bf16's next-token distribution from float32's (mean per-token KL(p_float32 || p_bf16), and how
often the top token is the same). A student is a run folder (a trained student, what matters) or
a mixer name (a fresh QKV-copied conversion). The control column rounds only the weights to bf16
and computes in float32: a model whose logits move that much from rounding alone is
ill-conditioned, not harmed by bf16 arithmetic. Fresh conversions are (measured: gla's KL 0.086
from weight rounding alone, the teacher's 0.0001), so judge bf16 on trained students.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shape", default="4x128", help="batch x tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--students", default=None,
                   help="comma-separated run folders or mixer names (fresh conversions), or 'all' mixers: "
                        "forward speed and drift")
    p.add_argument("--json", type=Path, default=None, help="with --students: also write the rows as JSON")
    p.add_argument("--cast-once", default=None, metavar="MODELS",
                   help="comma-separated 'teacher' and mixer names: bf16 forward with per-call weight casts "
                        "against weights cast once (evaluation's bf16 path)")
    args = p.parse_args(argv)
    if args.students:
        return students(args)
    if args.cast_once:
        return cast_once(args)
    from linearize.teacher import load_teacher

    torch.set_num_threads(args.threads)
    model, _ = load_teacher(None)
    model.train()
    for w in model.parameters():
        w.requires_grad_(True)
    b, t = (int(x) for x in args.shape.split("x"))
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))

    def one(bf16: bool, backward: bool) -> float:
        start = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if backward:
                model(input_ids=ids, labels=ids).loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids)
        model.zero_grad(set_to_none=True)
        return time.process_time() - start

    print(f"{torch.__version__}, {args.threads} thread(s), {b}x{t} tokens; CPU flags: "
          + " ".join(sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx512", "amx", "avx2"))})))
    for backward in (False, True):
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for bf16 in (False, True):
                times[bf16].append(one(bf16, backward))
        f32, bf = min(times[False]), min(times[True])
        print(f"{'forward+backward' if backward else 'forward'}: float32 {b * t / f32:.0f} tok/s, "
              f"bf16 autocast {b * t / bf:.0f} tok/s, bf16 / float32 = {f32 / bf:.2f}")
    print("load average:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    return 0


def cast_once(args) -> int:
    from linearize.convert import convert
    from linearize.evaluate import linear_weights_in
    from linearize.teacher import load_teacher

    torch.set_num_threads(args.threads)
    teacher, _ = load_teacher(None)
    b, t = (int(x) for x in args.shape.split("x"))
    ids = torch.randint(0, teacher.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    models = {name: teacher if name == "teacher" else convert(teacher, name, qkv_copy=True).eval()
              for name in args.cast_once.split(",")}
    print(f"{torch.__version__}, {args.threads} thread(s), {b}x{t} tokens, bf16 autocast forward; CPU flags: {flags()}")
    times = {(name, once): [] for name in models for once in (False, True)}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, model in models.items():
            for once in (False, True):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
                        linear_weights_in(model, torch.bfloat16 if once else None):
                    start = time.process_time()
                    model(input_ids=ids)
                    if r:
                        times[name, once].append(time.process_time() - start)
    for name in models:
        per_call, once = min(times[name, False]), min(times[name, True])
        print(f"{name}: weights cast per call {b * t / per_call:.0f} tok/s, cast once {b * t / once:.0f} tok/s, "
              f"once / per call = {per_call / once:.2f}")
    print("load average:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    return 0


def flags() -> str:
    return " ".join(sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx512", "amx", "avx2"))}))


def students(args) -> int:
    import copy
    import json

    import torch.nn.functional as F

    from linearize.convert import convert
    from linearize.data import token_blocks
    from linearize.evaluate import load_model
    from linearize.mixers import available
    from linearize.teacher import load_teacher

    torch.set_num_threads(args.threads)
    teacher, tok = load_teacher(None)
    teacher.eval()
    b, t = (int(x) for x in args.shape.split("x"))
    ids = token_blocks(tok, "mix", seq_len=t, split="validation", max_blocks=b)
    names = available() if args.students == "all" else args.students.split(",")
    print(f"{torch.__version__}, {args.threads} thread(s), {b}x{t} validation tokens (mix); CPU flags: {flags()}")
    print(f"{'model':34s} {'fp32 tok/s':>10s} {'bf16 tok/s':>10s} {'ratio':>6s} {'KL(fp32||bf16)':>15s} "
          f"{'same top-1':>10s} {'KL, weights rounded':>20s}")
    rows = []
    for name in ["teacher", *names]:
        if name == "teacher":
            model = teacher
        elif name in available():
            model, name = convert(teacher, name, qkv_copy=True).eval(), f"{name} (fresh conversion)"
        else:
            model, _, _ = load_model(name)
            model.eval()
        times, logp = {False: [], True: []}, {}
        with torch.no_grad():
            for _ in range(args.rounds):
                for bf16 in (False, True):
                    start = time.process_time()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        logits = model(input_ids=ids).logits
                    times[bf16].append(time.process_time() - start)
                    logp[bf16] = F.log_softmax(logits.float(), -1)
            rounded = copy.deepcopy(model)
            for w in rounded.parameters():
                w.copy_(w.to(torch.bfloat16).float())
            logp["rounded"] = F.log_softmax(rounded(input_ids=ids).logits, -1)
            del rounded

        def kl(other):
            return float((logp[False].exp() * (logp[False] - logp[other])).sum(-1).mean())

        same = float((logp[False].argmax(-1) == logp[True].argmax(-1)).float().mean())
        f32, bf = min(times[False]), min(times[True])
        rows.append({"model": name, "fp32_tok_s": b * t / f32, "bf16_tok_s": b * t / bf, "ratio": f32 / bf,
                     "kl": kl(True), "same_top1": same, "kl_weights_rounded": kl("rounded")})
        print(f"{name[-34:]:34s} {b * t / f32:10.0f} {b * t / bf:10.0f} {f32 / bf:6.2f} {kl(True):15.5f} "
              f"{100 * same:9.1f}% {kl('rounded'):20.5f}", flush=True)
        del model
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print("load average:", load)
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "threads": args.threads, "cpu_flags": flags(),
                                         "load": load, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
