"""Is a student's decode step flat in the context length? (issue 14: "flat within 10% from 128 to 16K")

docs/speed.md measures one context after another, so a drift of the machine between contexts
reads as a context effect (there the students lost 15-18% from 512 to 2K). Here each student is
prefilled once per context, every session stays alive, and the steps are interleaved across the
contexts round by round (ctx 1, ctx 2, ..., then again), so a load change hits every context
alike and only what the context itself does to a step remains. Each step is timed in wall and
in this process's CPU seconds; the median per context and its ratio to the shortest context are
printed with the load average.

    PYTHONPATH=lib .venv/bin/python benchmarks/decode_flatness.py --students deltanet,gla --contexts 128,512,2048,8192
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from linearize.bench_measure import Session, build_model


def measure(student: str, contexts: list[int], rounds: int, warmup: int, chunk: int, seed: int = 0,
            compiled: bool = False) -> dict:
    net = build_model(student, None, torch.float32, "cpu")
    if compiled:  # as docs/speed.md's students decode (speed.py --compile-decode)
        from linearize.decode import compile_decode

        compile_decode(net)
    token = torch.tensor([[5]])
    with torch.inference_mode():
        sessions = {}
        for ctx in contexts:
            torch.manual_seed(seed)
            sessions[ctx] = Session(net)
            sessions[ctx].prefill(torch.randint(0, net.config.vocab_size, (1, ctx)), chunk)
        wall = {c: [] for c in contexts}
        cpu = {c: [] for c in contexts}
        for r in range(rounds + warmup):
            for ctx, session in sessions.items():
                w, c = time.perf_counter(), time.process_time()
                session.step(token)
                if r >= warmup:
                    wall[ctx].append(time.perf_counter() - w)
                    cpu[ctx].append(time.process_time() - c)
    return {c: (statistics.median(wall[c]), statistics.median(cpu[c])) for c in contexts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="deltanet,gla")
    parser.add_argument("--contexts", default="128,512,2048,8192")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--compile-decode", action="store_true", help="the students' step compiled (inductor)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"{args.threads} thread(s), {args.rounds} rounds, {'compiled' if args.compile_decode else 'eager'} step; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    for student in args.students.split(","):
        res = measure(student, contexts, args.rounds, args.warmup, args.prefill_chunk, compiled=args.compile_decode)
        base_wall, base_cpu = res[contexts[0]]
        for ctx, (w, c) in res.items():
            print(f"{student:10s} ctx {ctx:6d}: {1e3 * w:7.1f} ms wall ({base_wall / w:.2f}x of ctx {contexts[0]}), "
                  f"{1e3 * c:7.1f} ms CPU ({base_cpu / c:.2f}x)", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
