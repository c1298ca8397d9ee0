"""Does bf16 autocast pay on this CPU? The teacher's forward and forward+backward, float32 against
``torch.autocast("cpu", dtype=torch.bfloat16)``, interleaved round by round in one process and
timed in CPU seconds (so a loaded machine hits both alike). Prints tokens/s and the ratio with the
load average. Issue 13 asks to measure bf16 before using it in stage 3: on a CPU without bf16
matrix instructions (AVX2 only) the autocast's conversions cost more than the halved bytes save.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bf16_cpu.py [--threads 1] [--shape 4x128]
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
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
