"""bf16 autocast in evaluation: how much faster, and how far the scores move, paired on the same documents.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bf16_eval.py --limit 500          # the teacher
    ... --run outputs/<arch>/<run>                                   # a student
    ... --against results/cpu-grid/teacher/eval_limit500.json       # float32 scores from a saved run
    ... --json /tmp/bf16_eval.json

Without ``--against`` the float32 evaluation runs first and the bf16 one after it, in this
process with the same workers and threads, so their wall times are a side-by-side ratio. With it,
float32's per-document scores are read from that file (the same first ``--limit`` documents of
each task) and only bf16 runs: the accuracy comparison holds, the time ratio does not.
Per task it prints both accuracies, the paired difference (bf16 - float32) with its 95%
bootstrap interval over documents, the share of documents scored the same and McNemar's exact
p; then the six-task average and the wall and CPU seconds (this process and its workers) with
the load average. Autocast pays only on a CPU with bf16 matrix units (AMX, listed in the first
line); benchmarks/bf16_cpu.py times the plain forward and backward.
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
    args = p.parse_args(argv)
    args.workers = args.workers if args.workers == "auto" else int(args.workers)
    torch.set_num_threads(args.threads)
    names = check_task_names(args.tasks)
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("amx", "avx512_bf16"))})
    print(f"torch {torch.__version__}, {args.threads} threads, workers {args.workers}, limit {args.limit}; "
          f"bf16 CPU flags: {' '.join(flags) or 'none (autocast will be slow)'}", flush=True)
    model, tok, label = load_model(args.run)
    model.eval()
    times = {}
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
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
