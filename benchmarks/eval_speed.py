"""Evaluation throughput: the scorer's tokens/s against the model's plain forward tokens/s.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py --limit 50              # teacher
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py --student gla --limit 50
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/eval_speed.py --run outputs/gla/cpu-study-kd
    ... --profile /tmp/eval.prof     # also a cProfile of the evaluation, top entries printed
    ... --compare-plain --limit 40   # LAMBADA/WinoGrande: projection at scored positions vs HFLM's
    ... --student gla --forward-ratio --plain-shapes 4x64   # plain forward, teacher against student
    .venv/bin/python benchmarks/eval_speed.py --count-tokens --limit 500   # no model: tokens each scorer feeds

One process, side by side: first the model's plain forward (no cache, no grad) on batches of
the shapes evaluation feeds, then ``evaluate_tasks`` on the six tasks at ``--limit`` documents
each, with a hook that counts the tokens every model forward receives and the time spent inside
forwards. It prints per task the wall time, the tokens fed, the scorer's tokens/s and the share
of wall time inside the model, then the extrapolation to 500 documents per task (linear in the
documents, except each task's set-up, timed on its own) and the load average,
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
    """Counts the input tokens and the seconds of every forward of the model's decoder body
    (``model.model``; the model itself if it has none). The body, not the whole model: the
    shared-context scorer calls the body directly and applies the LM head only at the scored
    positions, so hooks on the whole model saw none of its plain-scoring forwards; a whole-model
    forward (the scorer's cached path) runs the body once, so nothing is counted twice. The head's
    time is outside ``seconds``."""

    def __init__(self, model):
        self.tokens = 0
        self.seconds = 0.0
        self.calls = 0
        self._t = None
        body = getattr(model, "model", None) or model
        self._handles = [body.register_forward_pre_hook(self._pre, with_kwargs=True),
                         body.register_forward_hook(self._post)]

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


def _rows_cost(lengths: list[int], batch: int) -> int:
    """Tokens fed when rows of these lengths are sorted longest first and right-padded in
    batches of ``batch``."""
    lengths = sorted(lengths, reverse=True)
    return sum(len(lengths[i:i + batch]) * lengths[i] for i in range(0, len(lengths), batch))


def count_tokens(names, limit: int, batch: int = 8) -> dict:
    """Without a model: the tokens each scorer feeds for the first ``limit`` documents of each
    task, and the positions it projects onto the vocabulary ("head"). HFLM: one row per request
    (context + continuation - 1), all positions projected. Ours: linearize.scoring's plan
    (shared contexts by length bucket; the rest one row per request, only the continuation
    projected). Tokenised as context, then context + continuation (HFLM's split)."""
    from transformers import AutoTokenizer

    from linearize.scoring import plan_requests
    from linearize.tasks import load_tasks
    from linearize.teacher import resolve_teacher

    tok = AutoTokenizer.from_pretrained(resolve_teacher(None))
    out = {}
    for name, task in load_tasks(names).items():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        reqs = []
        for inst in task.instances:
            ctx_text, cont_text = inst.args
            ctx = tok.encode(ctx_text)
            reqs.append((None, ctx, tok.encode(ctx_text + cont_text)[len(ctx):]))
        max_length = 8192
        shared, plain = plan_requests(reqs, max_length)
        hflm_rows = [len(c) + len(x) - 1 for _, c, x in reqs]
        ours_fed, ours_head = 0, 0
        for bucket in shared:
            for i in range(0, len(bucket), batch):
                docs = bucket[i:i + batch]
                conts = [len(reqs[j][2]) for idx in docs for j in idx]
                ours_fed += len(reqs[docs[0][0]][1]) * len(docs) + len(conts) * (max(conts) - 1)
                ours_head += len(docs) + len(conts) * (max(conts) - 1)
        ours_fed += _rows_cost([hflm_rows[i] for i in plain], batch)
        ours_head += sum(len(reqs[i][2]) for i in plain)
        out[name] = {"docs": len({i.doc_id for i in task.instances}), "requests": len(reqs),
                     "shared_requests": len(reqs) - len(plain), "hflm_fed": _rows_cost(hflm_rows, batch),
                     "hflm_head": _rows_cost(hflm_rows, batch), "ours_fed": ours_fed, "ours_head": ours_head}
        r = out[name]
        print(f"{name:15s} {r['docs']} docs, {r['requests']} requests ({r['shared_requests']} shared): "
              f"HFLM feeds {r['hflm_fed']} tokens, ours {ours_fed} ({r['hflm_fed'] / ours_fed:.2f}x); "
              f"vocabulary projections {r['hflm_head']} vs {ours_head}", flush=True)
    return out


@torch.no_grad()
def forward_ratio(teacher, student, label: str, batch: int, seq: int) -> None:
    """Plain-forward tokens per CPU-second (what this process did, nearly independent of other
    load) and per wall second, teacher / student / teacher, on one random [batch, seq] block."""
    ids = torch.randint(0, teacher.config.vocab_size, (batch, seq))
    for name, m in (("teacher", teacher), (label, student), ("teacher", teacher)):
        m(input_ids=ids)
        c, w = time.process_time(), time.perf_counter()
        for _ in range(2):
            m(input_ids=ids)
        print(f"{name}: {2 * ids.numel() / (time.process_time() - c):.0f} tok per CPU-s, "
              f"{2 * ids.numel() / (time.perf_counter() - w):.0f} tok/s wall, load {os.getloadavg()[0]:.1f}",
              flush=True)


def compare_plain(model, tok, names, args) -> dict:
    """Wall time of the plain-row tasks with SharedContextLM.project_scored_only on and off,
    alternating the order per task, and whether every document gets the same accuracy."""
    from linearize.scoring import SharedContextLM

    evaluate_tasks(model, tok, tasks=[names[0]], limit=1, bootstrap_iters=0)  # set-up once
    out = {}
    for k, name in enumerate(names):
        res = {}
        for on in ((True, False) if k % 2 == 0 else (False, True)):
            SharedContextLM.project_scored_only = on
            t = time.perf_counter()
            r = evaluate_tasks(model, tok, tasks=[name], limit=args.limit, batch_size=args.batch_size,
                               bootstrap_iters=0)
            res[on] = (time.perf_counter() - t, r["tasks"][name]["per_doc"]["acc"])
        SharedContextLM.project_scored_only = True
        same = sum(a == b for a, b in zip(res[True][1], res[False][1]))
        out[name] = {"scored_only_s": res[True][0], "hflm_rows_s": res[False][0], "same_acc": same}
        print(f"{name:15s} HFLM rows {res[False][0]:6.1f} s, scored positions only {res[True][0]:6.1f} s: "
              f"{res[False][0] / res[True][0]:.2f}x; same acc on {same}/{len(res[True][1])} docs; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=50, help="documents per task (default 50)")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS))
    p.add_argument("--student", default=None, help="a fresh QKV-copied conversion into this student")
    p.add_argument("--run", default=None, help="a run folder (outputs/<arch>/<run>) or saved model to evaluate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plain-shapes", default="8x128",
                   help="batch x length of the plain forwards timed as the reference (comma-separated; "
                        "evaluation rows are 10-150 tokens, 8 per batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hflm", action="store_true", help="lm-eval's HFLM instead of the shared-context scorer")
    p.add_argument("--max-shared-state-mb", type=float, default=None,
                   help="share no context whose cache is larger than this a row (0: share none; default "
                        "linearize.scoring.MAX_SHARED_ROW_BYTES)")
    p.add_argument("--compare-plain", action="store_true",
                   help="only time the requests that share no context (LAMBADA, WinoGrande) with the output "
                        "projection at the scored positions against HFLM's full projection, alternating")
    p.add_argument("--forward-ratio", action="store_true",
                   help="only the plain forward of the teacher against --student (tokens per CPU-second), "
                        "on the first --plain-shapes block")
    p.add_argument("--count-tokens", action="store_true",
                   help="no model: count the tokens and vocabulary projections each scorer needs at --limit")
    p.add_argument("--profile", type=Path, default=None, help="write a cProfile of the evaluation here")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = check_task_names(args.tasks)
    if args.max_shared_state_mb is not None:
        from linearize.scoring import SharedContextLM

        SharedContextLM.max_shared_row_bytes = int(args.max_shared_state_mb * 2**20)
    if args.count_tokens:
        return count_tokens(names, args.limit, args.batch_size)
    model, tok, label = load_model(args.run)
    if args.student:
        from linearize.convert import convert

        teacher = model
        model, label = convert(model, args.student, qkv_copy=True).eval(), f"{args.student} (fresh conversion)"
        if args.forward_ratio:
            b, t = map(int, args.plain_shapes.split(",")[0].split("x"))
            return forward_ratio(teacher, model, args.student, b, t)
    model.eval()
    load = os.getloadavg()
    print(f"{label}: {args.threads} threads, limit {args.limit}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)
    shapes = [tuple(map(int, x.split("x"))) for x in args.plain_shapes.split(",")]
    plain = {f"{b}x{s}": plain_forward_tok_s(model, b, s) for b, s in shapes}
    print("plain forward tok/s: " + ", ".join(f"{k} {v:.0f}" for k, v in plain.items()), flush=True)
    plain_ref = max(plain.values())

    if args.compare_plain:
        return compare_plain(model, tok, [n for n in names if n in ("lambada_openai", "winogrande")], args)
    meter = ForwardMeter(model)
    profiler = cProfile.Profile() if args.profile else None
    rows = []
    # lm-eval's task set-up once, so that the per-task rows time the scoring and not the imports
    evaluate_tasks(model, tok, tasks=[names[0]], limit=1, bootstrap_iters=0, per_doc=True,
                   share_context=not args.hflm)
    total = time.perf_counter()
    from linearize.tasks import load_tasks

    for name in names:
        # building the task (reading and converting its whole data set) costs the same at any
        # limit: timed on its own so that only the rest is scaled to 500 documents
        t = time.perf_counter()
        load_tasks([name])
        setup = time.perf_counter() - t
        before = meter.snapshot()
        cpu = time.process_time()
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        out = evaluate_tasks(model, tok, tasks=[name], limit=args.limit, batch_size=args.batch_size,
                             bootstrap_iters=100, per_doc=True, share_context=not args.hflm)
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - t
        cpu = time.process_time() - cpu
        tokens, seconds, calls = (a - b for a, b in zip(meter.snapshot(), before))
        docs = out["tasks"][name]["n_docs"]
        rows.append({"task": name, "docs": docs, "wall_s": wall, "setup_s": min(setup, wall), "cpu_s": cpu, "tokens": tokens, "forward_s": seconds,
                     "forwards": calls, "acc": out["tasks"][name]["acc"]})
        print(f"{name:15s} {docs:4d} docs {wall:7.1f} s  {tokens:7d} tokens in {calls:4d} forwards  "
              f"{tokens / wall:6.0f} tok/s  in-model {100 * seconds / wall:4.0f}%  cpu {cpu:6.1f} s  "
              f"acc {out['tasks'][name]['acc']:.3f}",
              flush=True)
    total = time.perf_counter() - total
    meter.close()
    tokens = sum(r["tokens"] for r in rows)
    fwd = sum(r["forward_s"] for r in rows)
    est = sum(r["setup_s"] + (r["wall_s"] - r["setup_s"]) * 500 / r["docs"] for r in rows)
    est_compute = sum(r["forward_s"] * 500 / r["docs"] for r in rows)
    # CPU seconds of this process hardly depend on what else runs: on an idle machine with
    # `threads` cores the wall time lies between cpu / threads (all of it parallel) and cpu
    est_cpu = sum(r["cpu_s"] * 500 / r["docs"] for r in rows)  # set-up scaled too: an upper bound
    load_end = os.getloadavg()
    summary = {
        "model": label, "limit": args.limit, "threads": args.threads, "scorer": "hflm" if args.hflm else "shared",
        "plain_forward_tok_s": plain, "scorer_tok_s": tokens / total, "scorer_over_plain": tokens / total / plain_ref,
        "in_model_share": fwd / total, "wall_s": total, "tasks": rows,
        "extrapolated_6x500_s": est, "extrapolated_6x500_forward_s": est_compute,
        "extrapolated_6x500_cpu_s": est_cpu,
        "load_average_start": load[0], "load_average_end": load_end[0],
    }
    print(f"all: {total:.1f} s, {tokens} tokens, scorer {tokens / total:.0f} tok/s = "
          f"{summary['scorer_over_plain']:.2f}x the plain forward ({plain_ref:.0f} tok/s); "
          f"{100 * fwd / total:.0f}% of the wall time inside the decoder body's forwards")
    print(f"extrapolated to 500 documents per task (task set-up once, the rest x 500/docs): {est / 60:.1f} min wall "
          f"({est_compute / 60:.1f} min of it in model forwards); load average {load[0]:.2f} -> {load_end[0]:.2f}")
    print(f"CPU time extrapolated to 500 documents per task: {est_cpu / 60:.1f} CPU-min, i.e. "
          f"{est_cpu / args.threads / 60:.1f}-{est_cpu / 60:.1f} min wall on an idle machine with {args.threads} cores")
    if profiler:
        profiler.dump_stats(args.profile)
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(30)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
