"""Measurement for the inference benchmark: one (model, context) point, the decode of the
teacher and students side by side, and the machine's memory bandwidth.

Everything here runs in the process that measures; :mod:`linearize.bench_run` starts one fresh
child process per point (``python -m linearize.bench point ...``) and collects the rows, and
:mod:`linearize.bench` is the command line. Bytes are counted by :mod:`linearize.memory`.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Sequence

from .memory import (MIB, compact_bytes, lifetime_peak_rss_bytes, peak_rss_bytes, reset_peak_rss, tensor_bytes,
                     weight_bytes)

TEACHER = "teacher"
# The teacher compiled as transformers supports it (a StaticCache and torch.compile of its
# forward), beside the students' compiled step, so that a compiled student is also compared with
# a compiled teacher and not only with the eager one
TEACHER_COMPILED = "teacher (compiled)"
DTYPES = ("float32", "bfloat16", "float16", "float64")


class BenchError(RuntimeError):
    """A benchmark point that could not run (bad argument, crashed child, timeout)."""


# ---------------------------------------------------------------------------------------
# Devices, dtypes, bandwidth
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


def check_dtype(name: str) -> str:
    """``name`` if the benchmark runs in that dtype, else a ``BenchError`` that lists the choices."""
    if name not in DTYPES:
        raise BenchError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return name


def _dtype(name: str):
    import torch

    return getattr(torch, check_dtype(name))


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


class Session:
    """A model generating on the cache that ``generate`` would give it: the teacher on a
    transformers ``DynamicCache``, a converted student on its ``MixerCache`` (per layer, its
    mixer's state). The cache is the only difference between the two."""

    def __init__(self, model):
        from transformers import DynamicCache

        from .modeling import LinearizedLlamaForCausalLM, MixerCache

        self.model = model
        if isinstance(model, LinearizedLlamaForCausalLM):
            self.cache = MixerCache(len(model.model.layers))
        else:
            self.cache = DynamicCache(config=model.config)

    def step(self, ids):
        """Feed ``ids`` (a prompt chunk or one token per row); the last position's logits.

        logits_to_keep=1: generation needs only the last position; the full [T, vocab] logits
        would add 8192 x 49152 x 4 bytes = 1.5 GiB to the peak of an 8192-token prefill."""
        return self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def prefill(self, ids, chunk: int | None = None):
        """Feed a prompt in chunks of ``chunk`` tokens carrying the cache (None: in one pass);
        the last position's logits."""
        chunk = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], chunk):
            logits = self.step(ids[:, start:start + chunk])
        return logits

    def state(self) -> list[dict]:
        """What each cache layer holds: the teacher's ``keys`` and ``values``, a student's ``state``."""
        return [vars(layer) for layer in self.cache.layers]

    def state_bytes(self) -> int:
        return tensor_bytes(self.state())


class CompiledTeacherSession(Session):
    """The teacher on a transformers ``StaticCache`` of ``max_len`` positions, each single-token
    step through ``forward`` (the teacher's forward compiled by inductor, shapes static); a
    prompt goes through the eager forward. Positions are passed explicitly (``cache_position``),
    as a static cache needs."""

    def __init__(self, model, max_len: int, forward):
        from transformers import StaticCache

        self.model, self.forward, self.seen = model, forward, 0
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)

    def step(self, ids):
        import torch

        n = ids.shape[1]
        forward = self.forward if n == 1 else self.model.forward
        out = forward(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1,
                      cache_position=torch.arange(self.seen, self.seen + n, device=ids.device)).logits[:, -1]
        self.seen += n
        return out


def build_model(name: str, teacher: str | None, dtype, device: str):
    """The teacher or a freshly converted student, ready for a ``Session``.

    A fresh student (``qkv_copy=True``, untrained) costs exactly what a trained one costs: speed
    and memory depend on shapes, not on weight values. The teacher is dropped after conversion
    so that its weights do not stay resident beside the student's."""
    model = load_teacher_model(teacher, dtype, device)
    if name == TEACHER:
        return model
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
    return student


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
    net = build_model(model, teacher, _dtype(dtype), device)
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
        session = Session(net)
        _sync(device)
        t0 = time.perf_counter()
        logits = session.prefill(ids, chunk)
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
    compile_decode: bool | str = False,
    compile_teacher: bool = False,
) -> dict:
    """Decode tokens/s of the teacher and ``students`` at each context, measured in this one
    process with their steps interleaved over models and contexts (teacher at 128, student 1 at
    128, ..., teacher at 512, ...), so that a load change on a shared machine hits every model
    and every context alike and the ratios (student/teacher, and flatness across contexts) stay
    meaningful.

    At each context every model is prefilled with the same random prompt (students in chunks of
    ``prefill_chunk`` tokens, carrying the state, which bounds the chunked form's memory); then
    ``steps`` + 2 greedy steps run round-robin over every (context, model); the first two are
    warm-up. tok/s = 1 / median
    step time by ``clock`` (``time.process_time`` on a loaded machine: CPU seconds count the
    work, not the wait for a core). The teacher is skipped beyond its context limit. Also returned per model and
    context: ``bytes_per_step`` (weights + cache/state after the prefill). Peak memory: the
    teacher plus every student (about 0.55 GB each in float32).

    ``compile_decode``: the students step through ``linearize.decode.compile_decode`` (inductor):
    a name of ``decode.COMPILED_STEPS`` ("layer": one layer's step, shared; "model": every layer
    in one graph; "frozen": the same with the weights as constants), True for "layer", False for
    eager; the first step at each context, which compiles (later contexts reuse it), is timed into
    ``first_step_s`` (wall seconds) and logged, and, like every warm-up step, left out of tok/s.
    ``compile_teacher``: also the teacher compiled (``TEACHER_COMPILED``: its forward through
    torch.compile on a StaticCache sized to each context plus the steps, one compile per context),
    stepped in the same rounds."""
    import torch

    from . import mixers
    from .convert import convert

    from .decode import COMPILED_STEPS

    if compile_decode is True:
        compile_decode = "layer"
    if compile_decode and compile_decode not in COMPILED_STEPS:
        raise BenchError(f"compile_decode={compile_decode!r}: use one of {', '.join(COMPILED_STEPS)} (or False)")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    unknown = [s for s in students if s not in mixers.available()]
    if unknown:
        raise BenchError(f"Unknown student(s) {unknown}: choose from {', '.join(mixers.available())}.")
    net = load_teacher_model(teacher, torch.float32, "cpu")
    limit = context_limit(net)
    models = {TEACHER: net}
    if compile_teacher:
        import torch._dynamo.config as dynamo_config

        # one graph per context (the static cache's length is part of the shapes)
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(contexts))
        teacher_forward = torch.compile(net.forward, fullgraph=True, dynamic=False)
        models[TEACHER_COMPILED] = net
    for name in students:
        models[name] = convert(net, name, qkv_copy=True).requires_grad_(False).eval()
        if compile_decode:
            from .decode import compile_decode as _compile

            scope, freeze = COMPILED_STEPS[compile_decode]
            _compile(models[name], scope=scope, freeze=freeze)
    weights = {name: weight_bytes(m) for name, m in models.items()}
    out: dict = {"tok_s": {}, "bytes_per_step": {}, "state_bytes": {}, "weights_bytes": weights,
                 "steps": steps, "threads": threads, "teacher_limit": limit, "prefill_chunk": prefill_chunk,
                 "compile_decode": compile_decode, "compile_teacher": compile_teacher, "first_step_s": {}}
    vocab = net.config.vocab_size
    # Every (context, model) pair is prefilled first and then stepped round-robin, contexts
    # interleaved like the models: a sweep run context after context put any load change
    # between two contexts into the flatness ratio (a step's CPU time grows when the other core
    # is busy), and flatness is a ratio across contexts. The cost is holding every context's
    # cache at once: the teacher's at 128..8192 add up to about 0.5 GB.
    sessions, tokens, times = {}, {}, {}
    with torch.inference_mode():
        for ctx in contexts:
            ids = torch.randint(0, vocab, (1, ctx))
            active = {n: v for n, v in models.items()
                      if not (n in (TEACHER, TEACHER_COMPILED) and limit is not None and ctx > limit)}
            if len(active) < len(models):
                log(f"T={ctx}: teacher skipped (beyond its context limit of {limit})")
            t0 = time.perf_counter()
            for name, model in active.items():
                if name == TEACHER_COMPILED:
                    session = sessions[ctx, name] = CompiledTeacherSession(model, ctx + steps + 2, teacher_forward)
                else:
                    session = sessions[ctx, name] = Session(model)
                logits = session.prefill(ids, None if name in (TEACHER, TEACHER_COMPILED) else min(ctx, prefill_chunk))
                tokens[ctx, name] = logits.argmax(-1, keepdim=True)
                times[ctx, name] = []
            log(f"T={ctx}: prefilled in {time.perf_counter() - t0:.0f} s")
        for i in range(steps + 2):
            for (ctx, name), session in sessions.items():
                t1, w1 = clock(), time.perf_counter()
                logits = session.step(tokens[ctx, name])
                tokens[ctx, name] = logits.argmax(-1, keepdim=True)
                if i == 0:
                    out["first_step_s"].setdefault(name, {})[str(ctx)] = time.perf_counter() - w1
                if i >= 2:
                    times[ctx, name].append(clock() - t1)
    for (ctx, name), session in sessions.items():
        state = session.state_bytes()
        out["tok_s"].setdefault(name, {})[str(ctx)] = 1.0 / statistics.median(times[ctx, name])
        out["state_bytes"].setdefault(name, {})[str(ctx)] = state
        out["bytes_per_step"].setdefault(name, {})[str(ctx)] = weights[name] + state
    for ctx in contexts:
        here = [n for (c, n) in sessions if c == ctx]
        compiled = [n for n in here if (n == TEACHER_COMPILED) or (compile_decode and n != TEACHER)]
        if compiled:
            log(f"T={ctx}: first (compiling) step " + ", ".join(
                f"{n} {out['first_step_s'][n][str(ctx)]:.1f} s" for n in compiled) + " wall")
        log(f"T={ctx}: " + ", ".join(f"{n} {out['tok_s'][n][str(ctx)]:.1f}" for n in here) + " tok/s")
    del sessions
    gc.collect()
    return out
