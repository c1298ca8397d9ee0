"""Where a model's forward spends its time at evaluation's shapes: torch's profiler over the
body (no output projection, no cache) of the teacher and of fresh QKV-copied students, one
table of ops per model, with the forward's tokens/s.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/forward_profile.py teacher deltanet gla
    ... --threads 2 --shape 8x93 --rows 8
    ... --bf16        # under torch.autocast("cpu", bfloat16), as evaluate_tasks(autocast="bfloat16")
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="teacher and/or student names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shape", default="8x128", help="batch x tokens (default 8x128)")
    p.add_argument("--rows", type=int, default=12, help="ops shown per model")
    p.add_argument("--bf16", action="store_true", help="under bf16 autocast (evaluation's opt-in)")
    args = p.parse_args()
    import contextlib
    from linearize.convert import convert
    from linearize.teacher import load_teacher

    torch.set_num_threads(args.threads)
    batch, tokens = (int(x) for x in args.shape.split("x"))
    teacher, _ = load_teacher()
    ids = torch.randint(0, 1000, (batch, tokens))
    for name in args.models:
        model = teacher if name == "teacher" else convert(teacher, name, qkv_copy=True).eval()
        body = model.model
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with torch.no_grad(), cast:
            body(input_ids=ids, use_cache=False)  # warm-up
            start = time.perf_counter()
            body(input_ids=ids, use_cache=False)
            seconds = time.perf_counter() - start
            with torch.profiler.profile() as prof:
                body(input_ids=ids, use_cache=False)
        print(f"{name}: {batch * tokens / seconds:.0f} tok/s ({args.shape}, {args.threads} thread(s)"
              f"{', bf16 autocast' if args.bf16 else ''})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=40))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
