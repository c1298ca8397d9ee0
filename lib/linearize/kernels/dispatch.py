"""Choose between our PyTorch kernels and FLA's Triton kernels.

backend="torch": always ours. backend="fla": FLA's chunk kernels, and a clear error when the
tensors are not on CUDA or FLA is not importable (never a quiet fallback). backend="auto": FLA
on CUDA where FLA has the op, ours otherwise; on CUDA without FLA it warns once and uses ours.
Only the chunked form dispatches; the recurrent step is cheap and stays ours.
FLA layouts are [B, T, H, D]; ours are [B, H, T, D]: the wrappers transpose.

Dtypes: FLA's kernels compute in one dtype (``fla_dtype``: the autocast dtype inside autocast,
else the inputs' common dtype) and take and return float32 states. They do not take every dtype:
``use_fla`` is given the dtypes an op accepts, "auto" uses ours for any other, "fla" raises.

Test hook: ``allow_cpu_under_triton_interpreter()`` lets the CUDA branch take CPU tensors when
Triton's interpreter runs the kernels (TRITON_INTERPRET=1); only tests/fla_interpret turns it on.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "fla")
_warned = False
# Devices whose tensors FLA's kernels take: CUDA, plus the CPU while the interpreter test hook is on.
_fla_devices = ("cuda",)


def allow_cpu_under_triton_interpreter(enabled: bool = True) -> None:
    """TEST HOOK: let the CUDA branch (FLA's Triton kernels) take CPU tensors.

    Only meaningful under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is
    imported), which tests/fla_interpret uses to run FLA's kernels without a GPU. Not a fallback:
    with the hook off (the default) nothing changes, and turning it on elsewhere is an error."""
    global _fla_devices
    if enabled and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("allow_cpu_under_triton_interpreter() is a test hook for Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before triton is imported (see tests/fla_interpret)")
    _fla_devices = ("cuda", "cpu") if enabled else ("cuda",)


def _fla_ops():
    return importlib.import_module("fla.ops")


# FLA's Triton kernels are tuned for head dims up to 256; "auto" keeps wider feature maps
# (ReBased's d(d+1)/2 = 2080 quadratic features) on our kernels. backend="fla" still tries.
FLA_AUTO_MAX_DIM = 256


def fla_dtype(q: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """The dtype FLA's kernels compute in for these inputs: autocast's dtype inside autocast (the
    Triton kernels are not autocast-aware, and autocast leaves some inputs in float32, e.g. after
    DeltaNet's rsqrt), else the inputs' common dtype."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    dt = q.dtype
    for x in others:
        dt = torch.promote_types(dt, x.dtype)
    return dt


# What FLA 0.6 accepts: its chunk kernels use tl.dot, which has no float64; chunk_delta_rule
# asserts q.dtype != float32 ("Please use bfloat16").
FLA_GATED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLA_DELTA_DTYPES = (torch.float16, torch.bfloat16)


def use_fla(backend: str, device: torch.device, op: str, fla_has_op: bool = True,
            key_dim: int | None = None, dtype: torch.dtype | None = None,
            fla_dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "fla":
        if not fla_has_op:
            raise ValueError(f"FLA has no kernel for {op}; use backend='auto' or 'torch'")
        if device.type not in _fla_devices:
            raise RuntimeError(
                f"backend='fla' forces FLA's Triton kernel for {op}, which needs CUDA tensors "
                f"(got device {device}); use backend='torch' (or 'auto') on the CPU"
            )
        try:
            _fla_ops()
        except Exception as exc:  # ImportError, or triton failing to initialise
            raise RuntimeError(
                f"backend='fla' but flash-linear-attention cannot be imported ({exc}); "
                "pip install flash-linear-attention, or use backend='torch'"
            ) from exc
        if dtype is not None and fla_dtypes is not None and dtype not in fla_dtypes:
            raise ValueError(
                f"backend='fla': FLA's kernel for {op} does not take {dtype} (it takes "
                f"{', '.join(str(d) for d in fla_dtypes)}); run the model in one of those (or under "
                "autocast), or use backend='auto', which runs the project's kernel for this dtype"
            )
        return True
    if device.type not in _fla_devices or not fla_has_op:
        return False
    if key_dim is not None and key_dim > FLA_AUTO_MAX_DIM:
        return False
    if dtype is not None and fla_dtypes is not None and dtype not in fla_dtypes:
        return False  # e.g. the delta rule in float32: FLA refuses it, ours is exact
    try:
        _fla_ops()
    except Exception as exc:
        if not _warned:
            warnings.warn(f"CUDA tensors but FLA is not importable ({exc}); using the PyTorch kernels")
            _warned = True
        return False
    return True


def _btf(x):
    return None if x is None else x.transpose(1, 2).contiguous()


def _fla_inputs(q, k, v, initial_state):
    """q, k, v in the one dtype FLA computes in; the initial state in float32, as FLA wants it
    (chunk_gla asserts it)."""
    dt = fla_dtype(q, k, v)
    q, k, v = (x.to(dt) for x in (q, k, v))
    return q, k, v, None if initial_state is None else initial_state.float()


def fla_gated(q, k, v, g, initial_state, scale: float = 1.0):
    """FLA equivalent of ``gla_chunk``: chunk_gla (per-channel g), chunk_simple_gla (scalar/no g).

    Log decays go in as float32 (FLA accumulates them in float32). Returns the state in float32."""
    ops = _fla_ops()
    q, k, v, initial_state = _fla_inputs(q, k, v, initial_state)
    g = None if g is None else g.float()
    dv = v.shape[-1]
    if dv % 2:  # FLA's backward wants an even value width (the normaliser column makes V+1)
        v = torch.nn.functional.pad(v, (0, 1))
        if initial_state is not None:
            initial_state = torch.nn.functional.pad(initial_state, (0, 1))
    if g is not None and g.shape[-1] > 1:
        o, s = ops.chunk_gla(_btf(q), _btf(k), _btf(v), _btf(g), scale=scale,
                             initial_state=initial_state, output_final_state=True)
    else:
        gs = None if g is None else _btf(g[..., 0])
        o, s = ops.chunk_simple_gla(_btf(q), _btf(k), _btf(v), g=gs, scale=scale,
                                    initial_state=initial_state, output_final_state=True)
    return o.transpose(1, 2)[..., :dv], s[..., :dv]


def fla_delta(q, k, v, beta, initial_state, scale: float = 1.0):
    """FLA equivalent of ``delta_chunk`` (fp16/bf16 only, see FLA_DELTA_DTYPES); state in float32."""
    ops = _fla_ops()
    q, k, v, initial_state = _fla_inputs(q, k, v, initial_state)
    beta = beta.to(q.dtype)
    o, s = ops.chunk_delta_rule(_btf(q), _btf(k), _btf(v), _btf(beta), scale=scale,
                                initial_state=initial_state, output_final_state=True)
    return o.transpose(1, 2), s
