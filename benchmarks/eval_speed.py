"""Evaluation throughput: the scorer's tokens/s against the model's plain forward tokens/s.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py --limit 50              # teacher
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py --student gla --limit 50
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py --run outputs/gla/cpu-study-kd
    ... --profile /tmp/eval.prof     # also a cProfile of the evaluation, top entries printed

One process, side by side: first the model's plain forward (no cache, no grad) on batches of
the shapes evaluation feeds, then ``evaluate_tasks`` on the six tasks at ``--limit`` documents
each, with a hook that counts the tokens every model forward receives and the time spent inside
forwards. It prints per task the wall time, the tokens fed, the scorer's tokens/s and the share
of wall time inside the model, then the extrapolation to 500 documents per task (linear in the
documents: lm-eval's fixed set-up is counted in, so it is an upper bound) and the load average,
since on a shared machine every absolute number depends on it.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

from linearize.evaluate import evaluate_tasks, load_model
from linearize.tasks import PAPER_TASKS, check_task_names


class ForwardMeter:
    """Counts the input tokens and the seconds of every top-level model forward."""

    def __init__(self, model):
        self.tokens = 0
        self.seconds = 0.0
        self.calls = 0
        self._t = None
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.tokens += ids.numel()
        self.calls += 1
        self._t = time.perf_counter()

    def _post(self, module, args, out):
        self.seconds += time.perf_counter() - self._t

    def snapshot(self):
        return self.tokens, self.seconds, self.calls

    def close(self):
        for h in self._handles:
            h.remove()


@torch.no_grad()
def plain_forward_tok_s(model, batch: int, seq: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` tokens/s of a plain forward (no cache) on a [batch, seq] block."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    model(input_ids=ids)  # warm-up: first-call allocations
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids)
        best = max(best, ids.numel() / (time.perf_counter() - t))
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=50, help="documents per task (default 50)")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS))
    p.add_argument("--student", default=None, help="a fresh QKV-copied conversion into this student")
    p.add_argument("--run", default=None, help="a run folder (outputs/<arch>/<run>) or saved model to evaluate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hflm", action="store_true", help="lm-eval's HFLM instead of the shared-context scorer")
    p.add_argument("--profile", type=Path, default=None, help="write a cProfile of the evaluation here")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = check_task_names(args.tasks)
    model, tok, label = load_model(args.run)
    if args.student:
        from linearize.convert import convert

        model, label = convert(model, args.student, qkv_copy=True).eval(), f"{args.student} (fresh conversion)"
    model.eval()
    load = os.getloadavg()
    print(f"{label}: {args.threads} threads, limit {args.limit}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)
    # shapes evaluation feeds: many short rows (choices, LAMBADA) and some long contexts
    plain = {f"{b}x{s}": plain_forward_tok_s(model, b, s) for b, s in ((8, 64), (8, 128), (4, 256))}
    print("plain forward tok/s: " + ", ".join(f"{k} {v:.0f}" for k, v in plain.items()), flush=True)
    plain_ref = max(plain.values())

    meter = ForwardMeter(model)
    profiler = cProfile.Profile() if args.profile else None
    rows = []
    # lm-eval's task set-up once, so that the per-task rows time the scoring and not the imports
    evaluate_tasks(model, tok, tasks=[names[0]], limit=1, bootstrap_iters=0, per_doc=True,
                   share_context=not args.hflm)
    total = time.perf_counter()
    for name in names:
        before = meter.snapshot()
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        out = evaluate_tasks(model, tok, tasks=[name], limit=args.limit, batch_size=args.batch_size,
                             bootstrap_iters=100, per_doc=True, share_context=not args.hflm)
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - t
        tokens, seconds, calls = (a - b for a, b in zip(meter.snapshot(), before))
        docs = out["tasks"][name]["n_docs"]
        rows.append({"task": name, "docs": docs, "wall_s": wall, "tokens": tokens, "forward_s": seconds,
                     "forwards": calls, "acc": out["tasks"][name]["acc"]})
        print(f"{name:15s} {docs:4d} docs {wall:7.1f} s  {tokens:7d} tokens in {calls:4d} forwards  "
              f"{tokens / wall:6.0f} tok/s  in-model {100 * seconds / wall:4.0f}%  acc {out['tasks'][name]['acc']:.3f}",
              flush=True)
    total = time.perf_counter() - total
    meter.close()
    tokens = sum(r["tokens"] for r in rows)
    fwd = sum(r["forward_s"] for r in rows)
    est = sum(r["wall_s"] * 500 / r["docs"] for r in rows)
    est_compute = sum(r["forward_s"] * 500 / r["docs"] for r in rows)
    load_end = os.getloadavg()
    summary = {
        "model": label, "limit": args.limit, "threads": args.threads, "scorer": "hflm" if args.hflm else "shared",
        "plain_forward_tok_s": plain, "scorer_tok_s": tokens / total, "scorer_over_plain": tokens / total / plain_ref,
        "in_model_share": fwd / total, "wall_s": total, "tasks": rows,
        "extrapolated_6x500_s": est, "extrapolated_6x500_forward_s": est_compute,
        "load_average_start": load[0], "load_average_end": load_end[0],
    }
    print(f"all: {total:.1f} s, {tokens} tokens, scorer {tokens / total:.0f} tok/s = "
          f"{summary['scorer_over_plain']:.2f}x the plain forward ({plain_ref:.0f} tok/s); "
          f"{100 * fwd / total:.0f}% of the wall time inside model forwards")
    print(f"extrapolated to 500 documents per task: {est / 60:.1f} min wall "
          f"({est_compute / 60:.1f} min of it in model forwards); load average {load[0]:.2f} -> {load_end[0]:.2f}")
    if profiler:
        profiler.dump_stats(args.profile)
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(30)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
