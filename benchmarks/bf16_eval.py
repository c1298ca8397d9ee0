"""bf16 autocast in evaluation: how much faster, and how far the scores move, paired on the same documents.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bf16_eval.py --limit 500          # the teacher
    ... --run outputs/<arch>/<run>                                   # a student
    ... --against results/cpu-grid/teacher/eval_limit500.json       # float32 scores from a saved run
    ... --json /tmp/bf16_eval.json
    ... --student deltanet --precisions bfloat16 --speed-json EVAL.json   # time one precision alone

Without ``--against`` the float32 evaluation runs first and the bf16 one after it, in this
process with the same workers and threads, so their wall times are a side-by-side ratio. With it,
float32's per-document scores are read from that file (the same first ``--limit`` documents of
each task) and only bf16 runs: the accuracy comparison holds, the time ratio does not.
Per task it prints both accuracies, the paired difference (bf16 - float32) with its 95%
bootstrap interval over documents, the share of documents scored the same and McNemar's exact
p; then the six-task average and the wall and CPU seconds (this process and its workers) with
the load average. ``--precisions bfloat16`` (or ``float32``) runs that precision alone and
only times it: with ``--student ARCH`` (a fresh QKV-copied conversion, whose forward costs what a
trained student's does, so its seconds hold for any run of that architecture; its scores mean
nothing) it measures a student's evaluation time without a trained one at hand. ``--speed-json``
adds the wall seconds, at 500 documents and all six tasks, to the ``eval_seconds_6x500`` mapping
that ``benchmarks/speed.py --eval-json`` reads (one file gathers the teacher and students).
Autocast pays only on a CPU with bf16 matrix units (AMX, listed in the first line; on an
AVX2-only EPYC the teacher's bf16 evaluation scored 89 of 1482 requests in 8.6 minutes);
benchmarks/bf16_cpu.py times the plain forward and backward.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from linearize import compare as C
from linearize.evaluate import evaluate_tasks, load_model, load_results
from linearize.tasks import PAPER_TASKS, check_task_names


def cpu_seconds() -> float:
    t = os.times()  # the workers are forked children, waited for: their CPU counts here too
    return t.user + t.system + t.children_user + t.children_system


def timed(model, tok, names, args, autocast):
    load = os.getloadavg()[0]
    cpu, wall = cpu_seconds(), time.perf_counter()
    res = evaluate_tasks(model, tok, tasks=names, limit=args.limit, batch_size=args.batch_size,
                         per_doc=True, workers=args.workers, autocast=autocast)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    print(f"{autocast or 'float32':8s}: {wall:7.1f} s wall, {cpu:7.1f} CPU s, load average {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    return res, {"wall_s": wall, "cpu_s": cpu, "load_start": load, "load_end": os.getloadavg()[0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500, help="documents per task (default 500)")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS))
    p.add_argument("--run", default=None, help="a run folder or saved model (default: the teacher)")
    p.add_argument("--against", type=Path, default=None,
                   help="an eval_*.json with float32 per-document scores of the same model and documents")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    p.add_argument("--student", default=None, help="a fresh QKV-copied conversion into this student (timing)")
    p.add_argument("--precisions", default="float32,bfloat16",
                   help="'float32,bfloat16' (paired, the default), or one of them alone (timed, not compared)")
    p.add_argument("--speed-json", type=Path, default=None,
                   help="add this run's wall seconds to the eval_seconds_6x500 mapping in this file "
                        "(benchmarks/speed.py --eval-json); needs --limit 500 and the six tasks")
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    if not precisions or not set(precisions) <= {"float32", "bfloat16"}:
        raise SystemExit(f"--precisions {args.precisions!r}: name float32, bfloat16 or both, comma-separated")
    if args.against and "bfloat16" not in precisions:
        raise SystemExit("--against pairs a bf16 run with saved float32 scores: leave --precisions out")
    if args.student and args.run:
        raise SystemExit("--student converts the teacher afresh; leave out --run (or --student)")
    if args.speed_json and (args.limit != 500 or set(check_task_names(args.tasks)) != set(PAPER_TASKS)):
        raise SystemExit("--speed-json records the six tasks at 500 documents: use --limit 500 and all six tasks")
    args.workers = args.workers if args.workers == "auto" else int(args.workers)
    torch.set_num_threads(args.threads)
    names = check_task_names(args.tasks)
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("amx", "avx512_bf16"))})
    print(f"torch {torch.__version__}, {args.threads} threads, workers {args.workers}, limit {args.limit}; "
          f"bf16 CPU flags: {' '.join(flags) or 'none (autocast will be slow)'}", flush=True)
    model, tok, label = load_model(args.run)
    if args.student:
        from linearize.convert import convert

        model, label = convert(model, args.student, qkv_copy=True), f"{args.student} (fresh conversion)"
    model.eval()
    times = {}
    if len(precisions) == 1 and not args.against:  # with --against, bf16 is paired with the saved float32
        res, times[precisions[0]] = timed(model, tok, names, args, None if precisions == ["float32"] else "bfloat16")
        for name in names:
            print(f"{name:15s} {precisions[0]} {100 * res['tasks'][name]['acc']:5.1f}")
        summary = {"model": label, "limit": args.limit, "threads": args.threads, "workers": args.workers,
                   "cpu_flags": flags, "times": times, "torch": torch.__version__,
                   "acc": {n: res["tasks"][n]["acc"] for n in names}}
        return finish(summary, args)
    if args.against:
        f32 = load_results(args.against)
        if f32.get("autocast") or f32["limit"] != args.limit:
            raise SystemExit(f"{args.against} is not a float32 run at limit {args.limit} "
                             f"(autocast {f32.get('autocast')}, limit {f32['limit']})")
    else:
        f32, times["float32"] = timed(model, tok, names, args, None)
    bf16, times["bfloat16"] = timed(model, tok, names, args, "bfloat16")

    right_bf16, right_f32 = C.correctness(bf16), C.correctness(f32)
    paired = C.compare(right_bf16, right_f32, names)
    rows = {}
    for name in names:
        a, b = right_bf16[name], right_f32[name]
        same = sum(a[i] == b[i] for i in a if i in b) / len(set(a) & set(b))
        d = paired["tasks"][name]
        rows[name] = {"acc_float32": f32["tasks"][name]["acc"], "acc_bf16": bf16["tasks"][name]["acc"],
                      "diff": d["diff"], "lo": d["lo"], "hi": d["hi"], "same_docs": same,
                      "mcnemar_p": paired["mcnemar"][name]["p"], "docs": d["docs"]}
        print(f"{name:15s} float32 {100 * rows[name]['acc_float32']:5.1f}  bf16 {100 * rows[name]['acc_bf16']:5.1f}  "
              f"bf16 - float32 {100 * d['diff']:+5.1f} ({100 * d['lo']:+.1f} to {100 * d['hi']:+.1f})  "
              f"same on {100 * same:5.1f}% of {d['docs']} docs  McNemar p {rows[name]['mcnemar_p']:.2f}")
    avg = paired["avg"]
    print(f"{'six-task avg':15s} bf16 - float32 {100 * avg['diff']:+.2f} points ({100 * avg['lo']:+.2f} to {100 * avg['hi']:+.2f})")
    if "float32" in times:
        print(f"wall time bf16 / float32 = {times['bfloat16']['wall_s'] / times['float32']['wall_s']:.2f}, "
              f"CPU seconds {times['bfloat16']['cpu_s'] / times['float32']['cpu_s']:.2f}")
    summary = {"model": label, "limit": args.limit, "threads": args.threads, "workers": args.workers,
               "cpu_flags": flags, "against": str(args.against) if args.against else None, "times": times,
               "tasks": rows, "avg": avg, "torch": torch.__version__}
    return finish(summary, args)


def finish(summary: dict, args) -> dict:
    """Write the summary (--json) and add its wall times to the speed page's mapping (--speed-json)."""
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.speed_json:
        book = json.loads(args.speed_json.read_text()) if args.speed_json.exists() else {}
        n = args.threads if args.workers == "auto" else args.workers  # evaluate_tasks: one per thread
        n = min(n, len(check_task_names(args.tasks)))
        how = (f"1 process, {args.threads} threads" if n <= 1
               else f"{n} x {max(1, args.threads // n)}-thread workers")  # each worker: threads // workers
        for precision, t in summary["times"].items():
            kind = "float32" if precision == "float32" else "bf16, linear weights cast once"
            key = f"{summary['model']} ({kind}, {how})"
            book.setdefault("eval_seconds_6x500", {})[key] = round(t["wall_s"], 1)
            book.setdefault("load", {})[key] = [round(t["load_start"], 2), round(t["load_end"], 2)]
        book["eval_source"] = ("benchmarks/bf16_eval.py --limit 500 [--student ARCH] [--precisions P] --speed-json: "
                               "wall seconds of one evaluation of the six tasks, load average before and after in 'load'")
        args.speed_json.write_text(json.dumps(book, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
