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

CLI::

    python -m linearize.bench run --models teacher,gla,deltanet --lengths 128,512,2048,8192 \\
        --out outputs/bench/bench.csv
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

TEACHER = "teacher"
POINT_TAG = "LINEARIZE_BENCH_POINT "
BANDWIDTH_TAG = "LINEARIZE_BENCH_BANDWIDTH "
MIB = 2**20
DTYPES = ("float32", "bfloat16", "float16", "float64")
CSV_COLUMNS = [
    "model", "context", "prefill_tok_s", "decode_tok_s", "peak_rss_mib", "weights_mib",
    "state_mib", "bytes_per_step", "bandwidth_gbs", "roofline_tok_s", "fraction", "dtype",
    "threads", "device",
    # extra detail after the columns the issue asks for
    "state_compact_mib", "decode_ms", "prefill_s", "prefill_chunk", "steps", "load_peak_rss_mib", "peak_device_mib",
    "peak_rss_source", "teacher", "error",
]
# Targets from the issue, checked on the printed numbers (not by a timed test).
FLAT_TOLERANCE = 0.10  # student decode speed within 10% from 128 to 8192
BYTES_RATIO_SHARE = 0.90  # at 8192 speed ratio >= 90% of the bytes ratio
STATE_SHRINK = 20.0  # state at least 20x smaller than the teacher's KV cache


class BenchError(RuntimeError):
    """A benchmark point that could not run (bad argument, crashed child, timeout)."""


# ---------------------------------------------------------------------------------------
# Byte accounting
# ---------------------------------------------------------------------------------------
def kv_cache_bytes(config, tokens: int, batch: int = 1, bytes_per_elem: int = 4) -> int:
    """Bytes of a Llama KV cache holding ``tokens`` positions: K and V, per layer, per KV head.

    2 * layers * kv_heads * head_dim * tokens * bytes_per_elem * batch.
    """
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per_elem * batch


def tensor_bytes(obj: Any) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (dicts, sequences, a transformers
    ``Cache`` with ``layers``, or any object's attributes), each storage counted once."""
    import torch

    seen: set[int] = set()
    visited: set[int] = set()
    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr() if x.numel() else id(x)
            if key not in seen:
                seen.add(key)
                # count the storage, not the view: a view of a big buffer still holds all of it
                total += x.untyped_storage().nbytes()
            return
        if x is None or isinstance(x, (int, float, str, bool, bytes, torch.dtype, torch.device)):
            return
        if id(x) in visited:
            return
        visited.add(id(x))
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__"):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    return total


def compact_bytes(obj: Any) -> int:
    """Bytes of the elements of every tensor in ``obj`` (numel x element size), ignoring the
    storage a view keeps alive. Differs from ``tensor_bytes`` exactly when some state tensor is
    a slice of a larger buffer, which then stays resident (worth fixing in the mixer)."""
    import torch

    total = 0

    def walk(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return total


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, tied weights counted once."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


# ---------------------------------------------------------------------------------------
# Process memory
# ---------------------------------------------------------------------------------------
def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS so the reset high-water mark starts low."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reset mark is merely a bit higher
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; Linux only.

    Writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS. Returns False where
    that is not possible; the peak then includes loading (``peak_rss_source`` says which)."""
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM where readable, else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def lifetime_peak_rss_bytes() -> int:
    """Peak RSS over the whole process life (getrusage is not affected by clear_refs)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------------------------------
# Devices, threads, bandwidth
# ---------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu.")
    return device


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise BenchError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return getattr(torch, name)


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


def measure_bandwidth(device: str = "cpu", threads: int = 2, mib: int = 512, repeats: int = 9,
                      clock=time.perf_counter) -> dict:
    """Memory bandwidth in GB/s (1e9 bytes/s) of reading a ``mib`` MiB float32 tensor (``sum``),
    the access pattern of a decode step (weights and cache are read, little is written); a copy
    (read + write) is reported beside it.

    ``read_gbs`` is the best of ``repeats`` reads (after one warm-up): on a shared machine every
    slower read measured other processes' traffic too, not the memory system, and the median
    swung 10-54 GB/s between runs. The spread (min, median) is reported with it, so a run can
    tell how disturbed it was. ``clock=time.process_time`` times in CPU seconds (on a loaded
    machine wall time counts the wait for a core: 0.8 GB/s was read that way at load 12)."""
    import torch

    torch.set_num_threads(threads)
    n = mib * MIB // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    read, copy = [], []
    for _ in range(repeats + 1):  # the first round warms pages and caches, not counted
        _sync(device)
        t0 = clock()
        x.sum()
        _sync(device)
        t1 = clock()
        y.copy_(x)
        _sync(device)
        t2 = clock()
        read.append(x.nbytes / (t1 - t0) / 1e9)
        copy.append(2 * x.nbytes / (t2 - t1) / 1e9)
    read, copy = read[1:], copy[1:]
    return {
        "read_gbs": max(read),
        "read_gbs_median": statistics.median(read),
        "read_gbs_min": min(read),
        "copy_gbs": max(copy),
        "copy_gbs_median": statistics.median(copy),
        "mib": mib,
        "repeats": repeats,
        "threads": threads,
        "device": device,
    }


# ---------------------------------------------------------------------------------------
# Models and their generation sessions
# ---------------------------------------------------------------------------------------
def load_teacher_model(teacher: str | None, dtype, device: str):
    """The teacher as ``load_teacher`` resolves it, without a tokenizer (the benchmark feeds
    random token ids, and a tiny test teacher folder need not carry one)."""
    from transformers import AutoModelForCausalLM

    from .teacher import resolve_teacher

    model = AutoModelForCausalLM.from_pretrained(resolve_teacher(teacher), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False)


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class TeacherSession:
    """The teacher generating on a transformers ``DynamicCache`` (what ``generate`` uses)."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache(config=model.config)

    def prefill(self, ids):
        # logits_to_keep=1: generate() needs only the last position; the full [T, vocab]
        # logits would add 8192 x 49152 x 4 bytes = 1.5 GiB to the peak at T = 8192.
        return self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(self, token):
        return self.model(input_ids=token, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def state(self):
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def state_bytes(self) -> int:
        return tensor_bytes(self.state())


class StudentSession:
    """A converted student generating on its ``MixerCache`` (per layer, its mixer's state)."""

    def __init__(self, model):
        from .modeling import MixerCache

        self.model = model
        self.cache = MixerCache(len(model.model.layers))

    def prefill(self, ids):
        return self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(self, token):
        return self.model(input_ids=token, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def state(self):
        return [layer.state for layer in self.cache.layers]

    def state_bytes(self) -> int:
        return tensor_bytes(self.state())


def build_model(name: str, teacher: str | None, dtype, device: str):
    """(model, session class) for the teacher or a freshly converted student.

    A fresh student (``qkv_copy=True``, untrained) costs exactly what a trained one costs: speed
    and memory depend on shapes, not on weight values. The teacher is dropped after conversion
    so that its weights do not stay resident beside the student's."""
    model = load_teacher_model(teacher, dtype, device)
    if name == TEACHER:
        return model, TeacherSession
    from . import mixers
    from .convert import convert

    from .mixers.hybrid import parse_name

    try:
        arch, _ = parse_name(name)  # 'deltanet+w64': a hybrid student (beyond the paper)
    except ValueError as err:
        raise BenchError(str(err)) from None
    if arch not in mixers.available():
        raise BenchError(f"Unknown model {name!r}: use {TEACHER!r} or a student: {', '.join(mixers.available())}"
                         " (a hybrid with a softmax window: <student>+w<window>, e.g. deltanet+w64).")
    student = convert(model, name, qkv_copy=True).requires_grad_(False)
    del model
    return student, StudentSession


# ---------------------------------------------------------------------------------------
# One point (runs inside a fresh child process)
# ---------------------------------------------------------------------------------------
def measure_point(
    model: str,
    context: int,
    teacher: str | None = None,
    dtype: str = "float32",
    threads: int = 2,
    steps: int = 32,
    prefill_chunk: int | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Measure one (model, context) point in this process and return a result row."""
    import torch

    if context < 1 or steps < 1:
        raise BenchError(f"context ({context}) and steps ({steps}) must be positive.")
    device = resolve_device(device)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net, session_cls = build_model(model, teacher, _dtype(dtype), device)
    limit = context_limit(net) if model == TEACHER else None
    # A prompt may fill the teacher's window; the few timed decode steps after it run just
    # past it (RoPE and attention compute any position; only quality is untrained there,
    # and speed does not depend on it). A longer prompt is refused.
    if limit is not None and context > limit:
        raise BenchError(
            f"The teacher's context limit is {limit} positions; a {context}-token prompt exceeds it. "
            "Benchmark students beyond it, the teacher up to it."
        )
    vocab = net.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), device=device)
    chunk = prefill_chunk if (model != TEACHER and prefill_chunk) else context

    weights = weight_bytes(net)
    load_peak = lifetime_peak_rss_bytes()
    rss_source = "VmHWM after load" if reset_peak_rss() else "ru_maxrss incl. load"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    with torch.inference_mode():
        session = session_cls(net)
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, context, chunk):
            logits = session.prefill(ids[:, start:start + chunk])
        _sync(device)
        prefill_s = time.perf_counter() - t0
        state = session.state_bytes()
        state_compact = compact_bytes(session.state())
        token = logits.argmax(-1, keepdim=True)
        times = []
        for i in range(steps + 2):
            _sync(device)
            t0 = time.perf_counter()
            logits = session.step(token)
            token = logits.argmax(-1, keepdim=True)
            _sync(device)
            if i >= 2:  # two warm-up steps: first-call allocations, lazy inits
                times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "model": model,
        "context": context,
        "prefill_tok_s": context / prefill_s,
        "decode_tok_s": 1.0 / step_s,
        "peak_rss_mib": peak_rss_bytes() / MIB,
        "weights_mib": weights / MIB,
        "state_mib": state / MIB,
        "state_compact_mib": state_compact / MIB,
        "bytes_per_step": weights + state,
        "dtype": dtype,
        "threads": threads,
        "device": device,
        "decode_ms": step_s * 1e3,
        "prefill_s": prefill_s,
        "prefill_chunk": chunk,
        "steps": steps,
        "load_peak_rss_mib": load_peak / MIB,
        "peak_device_mib": torch.cuda.max_memory_allocated() / MIB if device.startswith("cuda") else "",
        "peak_rss_source": rss_source,
        "teacher": teacher or "embedded",
        "error": "",
    }


# ---------------------------------------------------------------------------------------
# Side by side: teacher and students decoding in one process, steps interleaved
# ---------------------------------------------------------------------------------------
def decode_side_by_side(
    students: Sequence[str],
    contexts: Sequence[int],
    teacher: str | None = None,
    steps: int = 16,
    threads: int = 2,
    prefill_chunk: int = 2048,
    seed: int = 0,
    log=print,
    clock=time.perf_counter,
) -> dict:
    """Decode tokens/s of the teacher and ``students`` at each context, measured in this one
    process with their steps interleaved (teacher step, student 1 step, ...), so that a load
    change on a shared machine hits every model alike and the ratios stay meaningful.

    At each context every model is prefilled with the same random prompt (students in chunks of
    ``prefill_chunk`` tokens, carrying the state, which bounds the chunked form's memory), then
    ``steps`` + 2 greedy steps run round-robin; the first two are warm-up. tok/s = 1 / median
    step time by ``clock`` (``time.process_time`` on a loaded machine: CPU seconds count the
    work, not the wait for a core). The teacher is skipped beyond its context limit. Also returned per model and
    context: ``bytes_per_step`` (weights + cache/state after the prefill). Peak memory: the
    teacher plus every student (about 0.55 GB each in float32)."""
    import torch

    from . import mixers
    from .convert import convert

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    unknown = [s for s in students if s not in mixers.available()]
    if unknown:
        raise BenchError(f"Unknown student(s) {unknown}: choose from {', '.join(mixers.available())}.")
    net = load_teacher_model(teacher, torch.float32, "cpu")
    limit = context_limit(net)
    models = {TEACHER: (net, TeacherSession)}
    for name in students:
        models[name] = (convert(net, name, qkv_copy=True).requires_grad_(False).eval(), StudentSession)
    weights = {name: weight_bytes(m) for name, (m, _) in models.items()}
    out: dict = {"tok_s": {}, "bytes_per_step": {}, "state_bytes": {}, "weights_bytes": weights,
                 "steps": steps, "threads": threads, "teacher_limit": limit, "prefill_chunk": prefill_chunk}
    vocab = net.config.vocab_size
    for ctx in contexts:
        ids = torch.randint(0, vocab, (1, ctx))
        active = {n: v for n, v in models.items() if not (n == TEACHER and limit is not None and ctx > limit)}
        if len(active) < len(models):
            log(f"T={ctx}: teacher skipped (beyond its context limit of {limit})")
        sessions, tokens, times = {}, {}, {n: [] for n in active}
        t0 = time.perf_counter()
        with torch.inference_mode():
            for name, (model, session_cls) in active.items():
                session = sessions[name] = session_cls(model)
                chunk = ctx if name == TEACHER else min(ctx, prefill_chunk)
                for start in range(0, ctx, chunk):
                    logits = session.prefill(ids[:, start:start + chunk])
                tokens[name] = logits.argmax(-1, keepdim=True)
            prefill_s = time.perf_counter() - t0
            for i in range(steps + 2):
                for name, session in sessions.items():
                    t1 = clock()
                    logits = session.step(tokens[name])
                    tokens[name] = logits.argmax(-1, keepdim=True)
                    if i >= 2:
                        times[name].append(clock() - t1)
        for name, session in sessions.items():
            state = session.state_bytes()
            out["tok_s"].setdefault(name, {})[str(ctx)] = 1.0 / statistics.median(times[name])
            out["state_bytes"].setdefault(name, {})[str(ctx)] = state
            out["bytes_per_step"].setdefault(name, {})[str(ctx)] = weights[name] + state
        log(f"T={ctx} (prefill {prefill_s:.0f} s): " + ", ".join(
            f"{n} {out['tok_s'][n][str(ctx)]:.1f}" for n in sessions) + " tok/s")
        del sessions
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------
# Orchestration (the parent process holds no model; every point runs in a child)
# ---------------------------------------------------------------------------------------
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
    if dtype not in DTYPES:
        raise BenchError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
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
# Reporting: table and the targets
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


def check_targets(rows: Sequence[dict], low: int = 128, high: int = 8192) -> list[str]:
    """PASS/FAIL lines for the issue's targets, computed from the measured rows.

    1. each student's decode speed is flat: every measured context in [low, high] decodes
       within 10% of the fastest of them (min/max >= 0.9);
    2. at ``high``: (student tok/s / teacher tok/s) >= 0.9 * (teacher bytes/step / student
       bytes/step), i.e. the student converts its smaller memory traffic into speed;
    3. at ``high``: the teacher's KV cache is at least 20x the student's state.
    A target with missing points says MISSING rather than passing."""
    ok = _ok(rows)
    students = sorted({m for m, _ in ok if m != TEACHER})
    lines = []
    t_high = ok.get((TEACHER, high))
    for s in students:
        speeds = {c: r["decode_tok_s"] for (m, c), r in ok.items() if m == s and low <= c <= high}
        if low in speeds and high in speeds:
            ratio = min(speeds.values()) / max(speeds.values())
            verdict = "PASS" if ratio >= 1 - FLAT_TOLERANCE else "FAIL"
            lines.append(f"{verdict} {s}: decode flat {low}..{high}: slowest/fastest = {ratio:.3f} "
                         f"(need >= {1 - FLAT_TOLERANCE:.2f}; {min(speeds.values()):.2f}..{max(speeds.values()):.2f} tok/s)")
        else:
            lines.append(f"MISSING {s}: decode flatness needs points at {low} and {high}")
        s_high = ok.get((s, high))
        if s_high and t_high:
            speed_ratio = s_high["decode_tok_s"] / t_high["decode_tok_s"]
            bytes_ratio = t_high["bytes_per_step"] / s_high["bytes_per_step"]
            verdict = "PASS" if speed_ratio >= BYTES_RATIO_SHARE * bytes_ratio else "FAIL"
            lines.append(f"{verdict} {s}: at {high} speed ratio {speed_ratio:.3f} vs bytes ratio {bytes_ratio:.3f} "
                         f"(need >= {BYTES_RATIO_SHARE:.0%} of it = {BYTES_RATIO_SHARE * bytes_ratio:.3f})")
            shrink = t_high["state_mib"] / s_high["state_mib"] if s_high["state_mib"] else float("inf")
            verdict = "PASS" if shrink >= STATE_SHRINK else "FAIL"
            lines.append(f"{verdict} {s}: at {high} teacher cache {t_high['state_mib']:.1f} MiB / state "
                         f"{s_high['state_mib']:.2f} MiB = {shrink:.1f}x (need >= {STATE_SHRINK:.0f}x)")
        else:
            lines.append(f"MISSING {s}: speed and state ratios need the teacher and {s} at {high}")
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


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
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
    p_point = sub.add_parser("point", help="(internal) measure one point in this process, print one JSON line")
    p_point.add_argument("--model", required=True)
    p_point.add_argument("--context", type=int, required=True)
    _common(p_point)
    p_bw = sub.add_parser("bandwidth", help="measure memory bandwidth, print one JSON line")
    p_bw.add_argument("--device", default="cpu")
    p_bw.add_argument("--threads", type=int, default=2)
    p_bw.add_argument("--mib", type=int, default=512, help="size of the tensor read and copied")
    p_table = sub.add_parser("table", help="print the table and target checks of existing CSVs (merged in order)")
    p_table.add_argument("csv", nargs="+")
    p_table.add_argument("--out", default=None, help="also write the merged rows to this CSV")
    args = parser.parse_args(argv)

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
    for line in check_targets(rows):
        print(line)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
