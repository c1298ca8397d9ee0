"""Choose between our PyTorch kernels and FLA's Triton kernels.

backend="torch": always ours. backend="fla": FLA's chunk kernels, and a clear error when the
tensors are not on CUDA or FLA is not importable (never a quiet fallback). backend="auto": FLA
on CUDA where FLA has the op, ours otherwise; on CUDA without FLA it warns once and uses ours.
Only the chunked form dispatches; the recurrent step is cheap and stays ours.
FLA layouts are [B, T, H, D]; ours are [B, H, T, D]: the wrappers transpose.
"""
from __future__ import annotations

import importlib
import warnings

import torch

BACKENDS = ("auto", "torch", "fla")
_warned = False


def _fla_ops():
    return importlib.import_module("fla.ops")


# FLA's Triton kernels are tuned for head dims up to 256; "auto" keeps wider feature maps
# (ReBased's d(d+1)/2 = 2080 quadratic features) on our kernels. backend="fla" still tries.
FLA_AUTO_MAX_DIM = 256


def use_fla(backend: str, device: torch.device, op: str, fla_has_op: bool = True,
            key_dim: int | None = None) -> bool:
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "fla":
        if not fla_has_op:
            raise ValueError(f"FLA has no kernel for {op}; use backend='auto' or 'torch'")
        if device.type != "cuda":
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
        return True
    if device.type != "cuda" or not fla_has_op:
        return False
    if key_dim is not None and key_dim > FLA_AUTO_MAX_DIM:
        return False
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


def fla_gated(q, k, v, g, initial_state, scale: float = 1.0):
    """FLA equivalent of ``gla_chunk``: chunk_gla (per-channel g), chunk_simple_gla (scalar/no g)."""
    ops = _fla_ops()
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
    ops = _fla_ops()
    o, s = ops.chunk_delta_rule(_btf(q), _btf(k), _btf(v), _btf(beta), scale=scale,
                                initial_state=initial_state, output_final_state=True)
    return o.transpose(1, 2), s
