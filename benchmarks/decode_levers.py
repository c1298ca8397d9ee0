"""Decode levers (issue 14), measured side by side: the teacher and each student's decode step
under several implementations ("variants"), all in this one process, steps interleaved round
by round (teacher, student variant 1, variant 2, ...), so load changes on the shared machine hit
every entry alike. Each entry is timed in this process's CPU seconds (time.process_time, as
docs/speed.json's decode_tok_s) and reported as tok/s = 1 / median step and as a ratio over the
teacher's step in the same run. The load average is printed with the numbers.

Variants of a student (same weights, same prefilled state, each on its own copy of it):
* conv1d   the short-conv step through F.conv1d and the reference kernel steps (before issue 14)
* ref      the reference kernel steps (``gla_step``/``delta_step``/``mlstm_step``): HEAD before
           the fused steps
* fused    the library's decode path as it is now (``*_step_fused``), eager
* compiled   ``linearize.decode.compile_decode(kernel_threads=None)``: the layer step compiled by
             inductor, its kernels on torch's intra-op threads
* compiled1  the same with inductor's kernels on one thread (``kernel_threads=1``, the default)
* model      ``compile_decode(scope="model")``: all layers' step as one compiled graph
* frozen     the same with inductor's freezing (``freeze=True``): weights as constants, the
             linear layers prepacked for oneDNN
* linears    not a step: only the model's matrix-vector products, every ``nn.Linear`` (the LM
             head included) applied once to a random vector, in the model's order. Its tok/s is
             the ceiling a step could reach if nothing but the weights' GEMVs cost time; it is
             also printed as GB/s of weights read (and measured for the teacher, beside it)

    PYTHONPATH=lib .venv/bin/python benchmarks/decode_levers.py --students deltanet,gla --contexts 128,2048
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _conv1d_forward(self, x, cache=None):
    """ShortConv.forward as it was before the window-times-filter step: F.conv1d for every length."""
    b, t, c = x.shape
    if cache is None:
        cache = self.init_state(b, x.device, x.dtype)
    xx = torch.cat([cache.to(x.dtype), x.transpose(1, 2)], dim=-1)
    y = F.silu(F.conv1d(xx, self.weight.to(x.dtype), groups=c)) if self.activation == "silu" else \
        F.conv1d(xx, self.weight.to(x.dtype), groups=c)
    return y.transpose(1, 2), xx[..., xx.shape[-1] - (self.width - 1):].clone()


def _reference_steps():
    from linearize.kernels import delta, gated
    from linearize.kernels import mlstm as _m  # noqa: F401  (kernels.mlstm is also a function)
    mmod = sys.modules["linearize.kernels.mlstm"]
    return [mock.patch.object(gated, "gla_step_fused", gated.gla_step),
            mock.patch.object(delta, "delta_step_fused", delta.delta_step),
            mock.patch.object(mmod, "mlstm_step_fused", mmod.mlstm_step)]


_COMPILED: dict = {}


class LinearsOnly:
    """Stands in for a decode session: ``step`` applies every ``nn.Linear`` of the model once to a
    random one-token input, and nothing else (no mixer, norm, cache or Python between layers)."""

    def __init__(self, model):
        self.linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.inputs = [torch.randn(1, m.in_features) for m in self.linears]
        self.bytes = sum(p.numel() * p.element_size() for m in self.linears for p in m.parameters(recurse=False))

    def step(self, token):
        for m, x in zip(self.linears, self.inputs):
            m(x)


@contextlib.contextmanager
def _compiled(model, kernel_threads, scope="layer", freeze=False):
    """The model takes linearize.decode's compiled step while inside: for scope "layer" one
    compiled function per kernel_threads setting, shared by every layer and student; for scope
    "model" one per model and setting (its graph holds that model's layers)."""
    from linearize.decode import compile_decode, uncompile_decode
    key = (kernel_threads, scope, freeze) + ((id(model),) if scope == "model" else ())
    if key not in _COMPILED:
        compile_decode(model, kernel_threads=kernel_threads, scope=scope, freeze=freeze)
        _COMPILED[key] = (model.model.__dict__.get("compiled_decode_body"),
                          model.model.layers[0].__dict__.get("compiled_decode_step"))
    body, step = _COMPILED[key]
    if body is not None:
        model.model.compiled_decode_body = body
    if step is not None:
        for layer in model.model.layers:
            layer.compiled_decode_step = step
    try:
        yield
    finally:
        uncompile_decode(model)


def variant_patches(name: str, model):
    from linearize.mixers.common import ShortConv
    if name == "fused":
        return []
    if name == "ref":
        return _reference_steps()
    if name == "conv1d":
        return _reference_steps() + [mock.patch.object(ShortConv, "forward", _conv1d_forward)]
    if name == "compiled":  # inductor's kernels on torch's intra-op threads
        return [_compiled(model, None)]
    if name == "compiled1":  # inductor's kernels single-threaded, GEMVs on torch's threads (the default)
        return [_compiled(model, 1)]
    if name == "model":  # every layer in one compiled graph
        return [_compiled(model, 1, scope="model")]
    if name == "frozen":  # the same with the weights frozen into it (oneDNN-prepacked linears)
        return [_compiled(model, 1, scope="model", freeze=True)]
    raise SystemExit(f"unknown variant {name!r}: conv1d, ref, fused, compiled, compiled1, model, frozen, linears")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--students", default="deltanet,gla")
    ap.add_argument("--contexts", default="128,2048")
    ap.add_argument("--variants", default="ref,fused")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    from linearize.bench_measure import Session, load_teacher_model
    from linearize.convert import convert

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = load_teacher_model(None, torch.float32, "cpu")
    students = {s: convert(teacher, s, qkv_copy=True).requires_grad_(False).eval() for s in args.students.split(",")}
    variants = args.variants.split(",")
    out = {"threads": args.threads, "steps": args.steps, "variants": variants, "points": []}
    for ctx in map(int, args.contexts.split(",")):
        ids = torch.randint(0, teacher.config.vocab_size, (1, ctx))
        entries = []  # (label, session, patches, model name)
        with torch.inference_mode():
            s = Session(teacher)
            s.prefill(ids)
            entries.append(("teacher", s, lambda: []))
            if "linears" in variants:
                entries.append(("teacher:linears", LinearsOnly(teacher), lambda: []))
            for name, model in students.items():
                base = Session(model)
                base.prefill(ids, min(ctx, args.prefill_chunk))
                for v in variants:
                    if v == "linears":
                        entries.append((f"{name}:linears", LinearsOnly(model), lambda: []))
                        continue
                    sess = Session(model)
                    sess.cache = copy.deepcopy(base.cache)
                    entries.append((f"{name}:{v}", sess, lambda v=v, model=model: variant_patches(v, model)))
            token = torch.zeros(1, 1, dtype=torch.long)
            times = {label: [] for label, _, _ in entries}
            first = {}  # the first step of each entry (a compiled variant's compilation), wall and CPU s
            load0 = loadavg()
            for i in range(args.steps + 2):
                for label, sess, patches in entries:
                    with contextlib.ExitStack() as stack:
                        for p in patches():
                            stack.enter_context(p)
                        t0, w0 = time.process_time(), time.perf_counter()
                        sess.step(token)
                        dt = time.process_time() - t0
                    if i == 0:
                        first[label] = {"wall_s": time.perf_counter() - w0, "cpu_s": dt}
                    if i >= 2:
                        times[label].append(dt)
            load1 = loadavg()
        med = {label: statistics.median(ts) for label, ts in times.items()}
        point = {"context": ctx, "loadavg_before": load0, "loadavg_after": load1,
                 "tok_s": {label: 1.0 / m for label, m in med.items()},
                 "over_teacher": {label: med["teacher"] / m for label, m in med.items()},
                 "first_step": first}
        gemv = {label: sess.bytes / med[label] / 1e9 for label, sess, _ in entries if isinstance(sess, LinearsOnly)}
        if gemv:
            point["linears_gb_s"] = gemv
        out["points"].append(point)
        print(f"T={ctx} load {load0} -> {load1}: " + ", ".join(
            f"{label} {point['tok_s'][label]:.2f} tok/s ({point['over_teacher'][label]:.2f}x)" for label in med),
            flush=True)
        if gemv:
            print("  weights read by the GEMVs alone: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in gemv.items()),
                  flush=True)
        slow = {k: v for k, v in first.items() if k.split(":")[-1] in ("compiled", "compiled1", "model", "frozen")}
        if slow:
            print("  first step (compiles): " + ", ".join(f"{k} {v['wall_s']:.1f} s wall / {v['cpu_s']:.1f} s CPU"
                                                         for k, v in slow.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
