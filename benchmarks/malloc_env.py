"""Does glibc's allocator cost the CPU study time? Runs one fixed training workload under
several malloc settings, alternating them, and prints wall, user and system time, minor page
faults and peak memory of each run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/malloc_env.py            # ~10 min on 2 cores
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/malloc_env.py --reps 1 --tokens 1024

Why: the timed default study spent 846 s in the kernel against 3201 s of user time, with 263M
minor page faults. PyTorch's CPU tensors come from malloc; glibc serves blocks above its mmap
threshold (at most 32 MiB) with a fresh mmap and returns them with munmap on free, so every
step's logits (4 x 128 x 49152 floats = 100 MB, several copies) are new pages that the kernel
must fault in and zero again. The settings below keep freed memory in the process instead.

The workload: stage 3 (end-to-end distillation) of a fresh DeltaNet conversion of the embedded
teacher at cpu-quick, ``--tokens`` tokens, one validation; each run in its own process and
output folder, so nothing is shared between them but the page cache.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
# name -> environment added to the run. glibc reads these MALLOC_*_ variables at start-up.
SETTINGS = {
    "glibc default": {},
    # never mmap, never give the heap top back: freed blocks are reused from the heap
    "no mmap, no trim": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * GIB)},
    # the largest fixed mmap threshold (32 MiB) and no trim: large logits still mmapped
    "threshold 32 MiB, no trim": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 * GIB)},
}


def run_once(env_extra: dict, tokens: int, arch: str, root: Path) -> dict:
    cmd = [sys.executable, "-m", "linearize.stages", "--arch", arch, "--stages", "3", "--root", str(root),
           "--set", f"stage3_tokens={tokens}", "--set", "val_blocks=2", "--set", "run_name=malloc",
           "--set", "measure_teacher_throughput=false"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **env_extra}
    log = root.parent / f"{root.name}.log"  # a file, not a pipe: a full pipe would stall the child
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource usage
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"workload failed ({code}) under {env_extra}:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt, "max_rss_gib": usage.ru_maxrss * 1024 / GIB}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2, help="runs per setting, interleaved (default 2)")
    p.add_argument("--tokens", type=int, default=4096, help="stage-3 tokens per run (default 4096: 8 steps)")
    p.add_argument("--arch", default="deltanet")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="malloc_env_") as tmp:
        for rep in range(args.reps):
            for i, (name, extra) in enumerate(SETTINGS.items()):
                res = run_once(extra, args.tokens, args.arch, Path(tmp) / f"{rep}-{i}")
                rows.append({"setting": name, "rep": rep, **res})
                print(f"{name:28s} rep {rep}: wall {res['wall_s']:6.1f} s  user {res['user_s']:6.1f} s  "
                      f"sys {res['sys_s']:6.1f} s  minor faults {res['minor_faults'] / 1e6:6.2f}M  "
                      f"peak RSS {res['max_rss_gib']:.2f} GiB", flush=True)
    print(f"\nmeans over {args.reps} interleaved run(s) of {args.arch} stage 3, {args.tokens} tokens:")
    base = None
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("wall_s", "user_s", "sys_s", "minor_faults", "max_rss_gib")}
        base = base or mean
        print(f"{name:28s} wall {mean['wall_s']:6.1f} s ({mean['wall_s'] / base['wall_s']:.2f}x)  "
              f"sys {mean['sys_s']:6.1f} s  faults {mean['minor_faults'] / 1e6:6.2f}M  "
              f"peak RSS {mean['max_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
