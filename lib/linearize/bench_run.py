"""Orchestration of the inference benchmark: every point in a fresh child process, the rows
as a CSV, the table, a checker of speed and memory targets, and the figures.

The parent process holds no model: it measures the bandwidth and each (model, context) point
in a child (``python -m linearize.bench bandwidth|point ...``, :mod:`linearize.bench_measure`)
that prints one tagged JSON line, so one point's allocations never inflate another's peak
memory, and a crashed or timed-out point is kept as a row with its ``error``.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .bench_measure import TEACHER, BenchError, check_dtype, measure_bandwidth, measure_point, resolve_device

POINT_TAG = "LINEARIZE_BENCH_POINT "
BANDWIDTH_TAG = "LINEARIZE_BENCH_BANDWIDTH "
CSV_COLUMNS = [
    "model", "context", "prefill_tok_s", "decode_tok_s", "peak_rss_mib", "weights_mib",
    "state_mib", "bytes_per_step", "bandwidth_gbs", "roofline_tok_s", "fraction", "dtype",
    "threads", "device",
    # extra detail after the columns the issue asks for
    "state_compact_mib", "decode_ms", "prefill_s", "prefill_chunk", "steps", "load_peak_rss_mib", "peak_device_mib",
    "peak_rss_source", "teacher", "error",
]


# ---------------------------------------------------------------------------------------
# Child processes (the parent process holds no model; every point runs in a child)
# ---------------------------------------------------------------------------------------
def child_env(threads: int) -> dict[str, str]:
    """Environment of a benchmark child: fixed thread count, OpenMP threads that sleep when
    idle (spinning threads slow everything down 15x on a shared 2-core machine)."""
    env = dict(os.environ)
    env.update(
        OMP_WAIT_POLICY="PASSIVE",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env



def _child(args: list[str], tag: str, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "linearize.bench", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads), timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(args)}") from err
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise BenchError(f"child `{' '.join(args)}` exited {proc.returncode} without a result:\n{tail}")


def bandwidth_in_child(device: str, threads: int, mib: int = 512, timeout: float = 300) -> dict:
    args = ["bandwidth", "--device", device, "--threads", str(threads), "--mib", str(mib)]
    return _child(args, BANDWIDTH_TAG, threads, timeout)


def point_in_child(
    model: str, context: int, teacher: str | None, dtype: str, threads: int, steps: int,
    prefill_chunk: int | None, device: str, timeout: float,
) -> dict:
    args = ["point", "--model", model, "--context", str(context), "--dtype", dtype,
            "--threads", str(threads), "--steps", str(steps), "--device", device,
            "--prefill-chunk", str(prefill_chunk or 0)]
    if teacher:
        args += ["--teacher", teacher]
    return _child(args, POINT_TAG, threads, timeout)


# ---------------------------------------------------------------------------------------
# A run: models x lengths, the rows as a CSV
# ---------------------------------------------------------------------------------------
def add_roofline(row: dict, bandwidth_gbs: float) -> dict:
    """The physical reference: the fastest decode a memory-bound step could reach."""
    roof = bandwidth_gbs * 1e9 / row["bytes_per_step"]
    row.update(bandwidth_gbs=bandwidth_gbs, roofline_tok_s=roof, fraction=row["decode_tok_s"] / roof)
    return row


def teacher_limit(teacher: str | None) -> int | None:
    """The teacher's max_position_embeddings, read from its config in a child-free way."""
    from transformers import AutoConfig

    from .teacher import resolve_teacher

    return getattr(AutoConfig.from_pretrained(resolve_teacher(teacher)), "max_position_embeddings", None)


def run(
    models: Sequence[str],
    lengths: Sequence[int],
    out: str | os.PathLike | None = None,
    teacher: str | None = None,
    dtype: str = "float32",
    threads: int = 2,
    steps: int = 32,
    prefill_chunk: int | None = None,
    device: str = "cpu",
    timeout: float = 1800,
    bandwidth_mib: int = 512,
    isolate: bool = True,
    student_lengths: Sequence[int] = (),
    log=print,
) -> list[dict]:
    """Benchmark every model at every length, each point in a fresh process; write ``out``.

    ``student_lengths`` are extra lengths for the students only (beyond the teacher's limit).
    ``isolate=False`` measures every point in this process instead (fast, for tests and quick
    looks; peak RSS then carries earlier points' memory and is not a per-point number).

    Teacher points beyond its context limit are skipped (logged); a point that fails is kept
    as a row with its ``error`` so one crash does not lose the rest of a long run."""
    check_dtype(dtype)
    if not models or not lengths:
        raise BenchError("Give at least one model (--models teacher,gla) and one length (--lengths 128,512).")
    if isolate:
        bw = bandwidth_in_child(device, threads, bandwidth_mib)
    else:
        bw = measure_bandwidth(resolve_device(device), threads, bandwidth_mib)
    log(f"bandwidth: read {bw['read_gbs']:.1f} GB/s (best of {bw['repeats']}; median {bw['read_gbs_median']:.1f}, "
        f"slowest {bw['read_gbs_min']:.1f}), copy {bw['copy_gbs']:.1f} GB/s ({bw['threads']} threads, {bw['device']})")
    limit = teacher_limit(teacher) if TEACHER in models else None
    rows: list[dict] = []
    # Length-major order: a long run that is stopped early still has every model at the
    # shorter lengths. Students also run at ``student_lengths``, after the shared ones.
    extra = [t for t in student_lengths if t not in lengths]
    points = [(m, t) for t in lengths for m in models] + [(m, t) for t in extra for m in models if m != TEACHER]
    for model, context in points:
        if model == TEACHER and limit is not None and context > limit:
            log(f"skip teacher at {context}: beyond its context limit of {limit}")
            continue
        t0 = time.perf_counter()
        try:
            if isolate:
                row = point_in_child(model, context, teacher, dtype, threads, steps, prefill_chunk, device, timeout)
            else:
                row = measure_point(model, context, teacher, dtype, threads, steps, prefill_chunk, device)
            add_roofline(row, bw["read_gbs"])
            log(f"{model:>10} T={context:<6} prefill {row['prefill_tok_s']:8.1f} tok/s  decode "
                f"{row['decode_tok_s']:6.2f} tok/s  state {row['state_mib']:8.2f} MiB  peak "
                f"{row['peak_rss_mib']:7.0f} MiB  ({time.perf_counter() - t0:.0f} s)")
        except BenchError as err:
            log(f"{model:>10} T={context:<6} FAILED: {err}")
            row = {"model": model, "context": context, "dtype": dtype, "threads": threads,
                   "device": device, "teacher": teacher or "embedded", "error": str(err).splitlines()[0]}
        rows.append(row)
        if out:
            write_csv(rows, out)  # after every point: a long run keeps what it measured
    return rows


def write_csv(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    return path


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a benchmark CSV with numbers as numbers (failed points keep empty fields)."""
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                try:
                    row[key] = int(value)
                except (TypeError, ValueError):
                    try:
                        row[key] = float(value)
                    except (TypeError, ValueError):
                        row[key] = value
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# Reporting: the table and targets checked on the measured rows
# ---------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict]) -> str:
    cols = [("model", "{}"), ("context", "{}"), ("prefill_tok_s", "{:.1f}"), ("decode_tok_s", "{:.2f}"),
            ("peak_rss_mib", "{:.0f}"), ("weights_mib", "{:.1f}"), ("state_mib", "{:.3f}"),
            ("state_compact_mib", "{:.3f}"),
            ("roofline_tok_s", "{:.1f}"), ("fraction", "{:.2f}")]
    table = [[name for name, _ in cols]]
    for row in rows:
        if row.get("error"):
            table.append([str(row["model"]), str(row["context"]), "FAILED: " + str(row["error"])[:60]]
                         + [""] * (len(cols) - 3))
            continue
        table.append([fmt.format(row[name]) if row.get(name, "") != "" else "-" for name, fmt in cols])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _ok(rows: Sequence[dict]) -> dict[tuple[str, int], dict]:
    return {(r["model"], int(r["context"])): r for r in rows if not r.get("error")}


def check_targets(
    rows: Sequence[dict],
    low: int,
    high: int,
    flat_within: float | None = None,
    bytes_share: float | None = None,
    state_shrink: float | None = None,
) -> list[str]:
    """PASS/FAIL lines for the targets the caller sets (the benchmark notebook sets an issue's),
    computed from the measured rows; a target left None is not checked.

    * ``flat_within``: each student's decode speed is flat: every measured context in
      [low, high] decodes within this fraction of the fastest of them (slowest/fastest >= 1 -
      flat_within);
    * ``bytes_share``: at ``high``, (student tok/s / teacher tok/s) >= bytes_share * (teacher
      bytes/step / student bytes/step), i.e. the student converts its smaller memory traffic
      into speed;
    * ``state_shrink``: at ``high``, the teacher's KV cache is at least this many times the
      student's state.
    A target with missing points says MISSING rather than passing."""
    ok = _ok(rows)
    students = sorted({m for m, _ in ok if m != TEACHER})
    lines = []
    t_high = ok.get((TEACHER, high))
    for s in students:
        if flat_within is not None:
            speeds = {c: r["decode_tok_s"] for (m, c), r in ok.items() if m == s and low <= c <= high}
            if low in speeds and high in speeds:
                ratio = min(speeds.values()) / max(speeds.values())
                verdict = "PASS" if ratio >= 1 - flat_within else "FAIL"
                lines.append(f"{verdict} {s}: decode flat {low}..{high}: slowest/fastest = {ratio:.3f} "
                             f"(need >= {1 - flat_within:.2f}; {min(speeds.values()):.2f}..{max(speeds.values()):.2f} tok/s)")
            else:
                lines.append(f"MISSING {s}: decode flatness needs points at {low} and {high}")
        if bytes_share is None and state_shrink is None:
            continue
        s_high = ok.get((s, high))
        if not (s_high and t_high):
            lines.append(f"MISSING {s}: speed and state ratios need the teacher and {s} at {high}")
            continue
        if bytes_share is not None:
            speed_ratio = s_high["decode_tok_s"] / t_high["decode_tok_s"]
            bytes_ratio = t_high["bytes_per_step"] / s_high["bytes_per_step"]
            verdict = "PASS" if speed_ratio >= bytes_share * bytes_ratio else "FAIL"
            lines.append(f"{verdict} {s}: at {high} speed ratio {speed_ratio:.3f} vs bytes ratio {bytes_ratio:.3f} "
                         f"(need >= {bytes_share:.0%} of it = {bytes_share * bytes_ratio:.3f})")
        if state_shrink is not None:
            shrink = t_high["state_mib"] / s_high["state_mib"] if s_high["state_mib"] else float("inf")
            verdict = "PASS" if shrink >= state_shrink else "FAIL"
            lines.append(f"{verdict} {s}: at {high} teacher cache {t_high['state_mib']:.1f} MiB / state "
                         f"{s_high['state_mib']:.2f} MiB = {shrink:.1f}x (need >= {state_shrink:.0f}x)")
    return lines


# ---------------------------------------------------------------------------------------
# Plots (used by notebooks/04_benchmark.ipynb)
# ---------------------------------------------------------------------------------------
def plot(rows_or_csv, out_dir: str | os.PathLike) -> list[Path]:
    """Decode speed, prefill speed and memory against context (log x); PNGs into ``out_dir``."""
    import pandas as pd

    from .viz import plot_bench, save_png  # one style per model across the study's figures

    rows = read_csv(rows_or_csv) if isinstance(rows_or_csv, (str, os.PathLike)) else list(rows_or_csv)
    df = pd.DataFrame([r for r in rows if not r.get("error")])
    return [save_png(fig, Path(out_dir) / name, dpi=120) for name, fig in plot_bench(df).items()]
