"""Inference benchmark: prefill and decode speed and memory against context length.

For the teacher (softmax attention on a growing KV cache, ``DynamicCache``) and each student
(a constant-size recurrent state) this measures, at each context length T:

* prefill tokens/s: one forward pass over T random tokens that fills the cache or state
  (students may prefill in chunks of ``prefill_chunk`` tokens, carrying the state; off by
  default because the student model runs every chunk after the first through the token-by-
  token recurrence, and one chunked-form pass already needs only O(T x chunk) memory);
* decode tokens/s: 1 / median seconds of one decode step, over ``steps`` greedy steps that
  follow the prefill (two untimed warm-up steps first);
* peak RSS of the process during prefill + decode (the high-water mark is reset after the
  model is loaded, so loading and conversion do not count; ``load_peak_rss_mib`` is the peak
  up to then), the weights' bytes and the bytes of the cache or state after the prefill
  (``state_mib``: the storage the state tensors keep alive; ``state_compact_mib``: their
  elements only, smaller when a state tensor is a view into a larger buffer);
* a physical reference: a decode step must at least read every weight and the whole cache or
  state once, so ``bytes_per_step / bandwidth`` bounds the step time from below; the machine's
  bandwidth is measured in the same run and each point reports its achieved fraction.

Every point runs in a fresh child process (``python -m linearize.bench point ...``) that
prints one JSON line, so one point's allocations never inflate another's peak memory. One
dtype per run (float32 by default), since mixed dtypes slow CPU attention down unevenly.

This module is the command line and the benchmark's public face (``from linearize import
bench``); the work lives in :mod:`linearize.bench_measure` (a point, side-by-side decode,
bandwidth), :mod:`linearize.bench_run` (child processes, the CSV, table, target checks and
figures) and :mod:`linearize.memory` (bytes of weights, caches, states and the process).

CLI::

    python -m linearize.bench run --models teacher,gla,deltanet --lengths 128,512,2048,8192 \\
        --out outputs/bench/bench.csv
    python -m linearize.bench table outputs/bench/bench.csv --target-range 128,8192 \\
        --flat-within 0.1 --bytes-share 0.9 --state-shrink 20
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from .bench_measure import (DTYPES, TEACHER, BenchError, Session, build_model, context_limit, decode_side_by_side,
                            load_teacher_model, measure_bandwidth, measure_point, resolve_device)
from .bench_run import (BANDWIDTH_TAG, CSV_COLUMNS, POINT_TAG, add_roofline, check_targets, child_env, format_table,
                        plot, read_csv, run, write_csv)
from .memory import MIB, compact_bytes, kv_cache_bytes, tensor_bytes, weight_bytes

__all__ = [  # the benchmark's API, as notebooks, benchmarks/ and tests import it (linearize.bench.X)
    "BANDWIDTH_TAG", "CSV_COLUMNS", "DTYPES", "MIB", "POINT_TAG", "TEACHER", "BenchError", "Session", "add_roofline",
    "as_list", "build_model", "check_targets", "child_env", "compact_bytes", "context_limit", "decode_side_by_side",
    "format_table", "kv_cache_bytes", "load_teacher_model", "main", "measure_bandwidth", "measure_point", "plot",
    "read_csv", "resolve_device", "run", "tensor_bytes", "weight_bytes", "write_csv",
]


def as_list(value, kind=str) -> list:
    """A list from a papermill/CLI parameter: "a,b", a single value (papermill turns "48" into
    48) or a list already; None and "" give []."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [kind(v) for v in value]
    return [kind(v.strip()) for v in str(value).split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 128,512, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _targets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("targets", "checked on the rows and printed as PASS/FAIL/MISSING lines when given")
    g.add_argument("--target-range", type=_ints, default=None, metavar="LOW,HIGH",
                   help="contexts the targets compare, e.g. 128,8192 (needed with any target)")
    g.add_argument("--flat-within", type=float, default=None,
                   help="students' decode speed over LOW..HIGH within this fraction of its fastest, e.g. 0.1")
    g.add_argument("--bytes-share", type=float, default=None,
                   help="at HIGH the student/teacher speed ratio reaches this share of the bytes ratio, e.g. 0.9")
    g.add_argument("--state-shrink", type=float, default=None,
                   help="at HIGH the teacher's cache is at least this many times a student's state, e.g. 20")


def _target_lines(parser: argparse.ArgumentParser, args, rows: Sequence[dict]) -> list[str]:
    targets = dict(flat_within=args.flat_within, bytes_share=args.bytes_share, state_shrink=args.state_shrink)
    if all(v is None for v in targets.values()):
        return []
    if not args.target_range or len(args.target_range) != 2:
        parser.error("targets need --target-range LOW,HIGH (two contexts, e.g. 128,8192)")
    return check_targets(rows, *args.target_range, **targets)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=None, help="embedded (default), a hub id or a folder with config.json")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps after the prefill")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="students prefill in chunks of this many tokens, carrying the state (0: one pass)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearize.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="benchmark models x lengths, one fresh process per point; write a CSV")
    p_run.add_argument("--models", type=_names, default=[TEACHER, "gla", "deltanet"])
    p_run.add_argument("--lengths", type=_ints, default=[128, 512, 2048, 8192])
    p_run.add_argument("--student-lengths", type=_ints, default=[],
                       help="extra lengths for students only, e.g. 16384 (beyond the teacher's limit)")
    p_run.add_argument("--out", default="outputs/bench/bench.csv")
    p_run.add_argument("--timeout", type=float, default=1800, help="seconds per point")
    p_run.add_argument("--bandwidth-mib", type=int, default=512, help="tensor size for the bandwidth probe")
    _common(p_run)
    _targets(p_run)
    p_point = sub.add_parser("point", help="(internal) measure one point in this process, print one JSON line")
    p_point.add_argument("--model", required=True)
    p_point.add_argument("--context", type=int, required=True)
    _common(p_point)
    p_bw = sub.add_parser("bandwidth", help="measure memory bandwidth, print one JSON line")
    p_bw.add_argument("--device", default="cpu")
    p_bw.add_argument("--threads", type=int, default=2)
    p_bw.add_argument("--mib", type=int, default=512, help="size of the tensor read and copied")
    p_table = sub.add_parser("table", help="print the table (and target checks) of existing CSVs (merged in order)")
    p_table.add_argument("csv", nargs="+")
    p_table.add_argument("--out", default=None, help="also write the merged rows to this CSV")
    _targets(p_table)
    args = parser.parse_args(argv)
    if args.command in ("run", "table"):
        _target_lines(parser, args, [])  # a target without its range is refused before any measuring

    if args.command == "point":
        row = measure_point(args.model, args.context, args.teacher, args.dtype, args.threads, args.steps,
                            args.prefill_chunk or None, args.device)
        print(POINT_TAG + json.dumps(row), flush=True)
        return 0
    if args.command == "bandwidth":
        print(BANDWIDTH_TAG + json.dumps(measure_bandwidth(resolve_device(args.device), args.threads, args.mib)), flush=True)
        return 0
    if args.command == "table":
        # later files win for the same (model, context): a re-measured point replaces the old one
        merged: dict[tuple, dict] = {}
        for path in args.csv:
            for row in read_csv(path):
                merged[(row["model"], row["context"])] = row
        rows = list(merged.values())
        if args.out:
            write_csv(rows, args.out)
    else:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        print(f"benchmark started {started}: models {','.join(args.models)}, lengths "
              f"{','.join(map(str, args.lengths))}, {args.dtype}, {args.threads} threads, {args.device}")
        rows = run(args.models, args.lengths, args.out, args.teacher, args.dtype, args.threads, args.steps,
                   args.prefill_chunk or None, args.device, args.timeout, args.bandwidth_mib,
                   student_lengths=args.student_lengths)
        print(f"wrote {args.out}")
    print(format_table(rows))
    for line in _target_lines(parser, args, rows):
        print(line)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
