"""ReBased's two stateless forms side by side: the chunked form (``quadratic_chunk``, 2080-wide
features and a state per chunk) against the T x T form (``quadratic_parallel``), forward (or
forward+backward with ``--backward``, in CPU seconds), at
SmolLM2-135M's attention shapes (9 query / 3 KV heads, d = V = 64), per sequence length; and
the whole converted student's forward at evaluation's shapes with the T x T form switched on
and off (``--model``). The crossover sets ``linearize.mixers.rebased.QUADRATIC_MAX_T``.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rebased_forms.py --threads 1
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rebased_forms.py --threads 1 --backward --batch 1
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/rebased_forms.py --threads 1 --model
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from linearize.mixers import rebased as R


def best(fn, reps: int, clock=time.perf_counter) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def kernels(lengths, batch: int, reps: int, backward: bool) -> None:
    torch.manual_seed(0)
    for t in lengths:
        a = (torch.randn(batch, 9, t, 64) * 0.1).requires_grad_(backward)
        b, v = (torch.randn(batch, 3, t, 64).requires_grad_(backward) for _ in range(2))
        with torch.no_grad():
            chunk = R.quadratic_chunk(a, b, v, 64, 1e-6)[0]
            err = ((chunk - R.quadratic_parallel(a, b, v, 1e-6)).abs().max() / chunk.abs().max()).item()

        def run(form):
            if not backward:
                return lambda: form()
            return lambda: form().square().mean().backward()
        # CPU seconds of this process: another job on the machine costs wall time, not these
        tc = best(run(lambda: R.quadratic_chunk(a, b, v, 64, 1e-6)[0]), reps, time.process_time)
        tq = best(run(lambda: R.quadratic_parallel(a, b, v, 1e-6)), reps, time.process_time)
        print(f"T={t:5d}  {'fwd+bwd' if backward else 'fwd'}  chunked {tc * 1e3:7.1f} ms  T x T {tq * 1e3:7.1f} ms  "
              f"chunked / T x T {tc / tq:5.1f}  max rel. difference {err:.1e}", flush=True)


def model(lengths, batch: int, reps: int) -> None:
    from linearize.convert import convert
    from linearize.teacher import load_teacher

    teacher, _ = load_teacher()
    body = convert(teacher, "rebased", qkv_copy=True).eval().model
    limit = R.QUADRATIC_MAX_T
    with torch.no_grad():
        for t in lengths:
            ids = torch.randint(0, 1000, (batch, t))
            R.QUADRATIC_MAX_T = 0
            tc = best(lambda: body(input_ids=ids, use_cache=False), reps)
            R.QUADRATIC_MAX_T = limit
            tq = best(lambda: body(input_ids=ids, use_cache=False), reps)
            print(f"student forward {batch}x{t}: chunked {batch * t / tc:6.0f} tok/s, "
                  f"T x T {batch * t / tq:6.0f} tok/s ({tc / tq:.1f}x)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", default="64,128,256,512,1024,2048")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", action="store_true", help="the whole student's forward at 8 x {41,93,128}")
    p.add_argument("--backward", action="store_true", help="time forward+backward of the kernels")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model([41, 93, 128], args.batch, args.reps)
    else:
        kernels([int(x) for x in args.lengths.split(",")], args.batch, args.reps, args.backward)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
