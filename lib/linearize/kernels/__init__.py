"""Token-mixing kernels in pure PyTorch, one family per kind of recurrence, with FLA dispatch.

Families (each with a chunked form, a recurrent step and a materialised mixing matrix):
* ``gated``  gated linear attention: per-channel, scalar or no decay (+ optional normaliser)
* ``delta``  the delta rule (DeltaNet)
* ``mlstm``  xLSTM's mLSTM cell with its max-state stabiliser

The three entry points below pick the form (``mode``) and the backend; mixers call these.
All take [B, H, T, D] tensors and return (o, final state).

State dtype (the generation cache): ``state_dtype(q.dtype)``, i.e. float32 for fp16/bf16 inputs
and the inputs' own dtype for float32/float64, on every backend. FLA's kernels take and return
float32 states (chunk_gla refuses any other initial state), and a state that sums thousands of
decayed updates keeps its precision in float32; our kernels return theirs in the same dtype, and
the recurrent step (generation) computes in it and returns the output in the inputs' dtype.
"""
from __future__ import annotations

import torch

from .delta import delta_chunk, delta_matrix, delta_recurrent, delta_step, delta_step_fused
from .dispatch import FLA_DELTA_DTYPES, FLA_GATED_DTYPES, fla_delta, fla_dtype, fla_gated, use_fla
from .gated import (append_ones, gla_chunk, gla_matrix, gla_recurrent, gla_step, gla_step_fused, segsum,
                    split_normaliser)
from .mlstm import mlstm_chunk, mlstm_matrix, mlstm_recurrent, mlstm_step, mlstm_step_fused

MODES = ("chunk", "recurrent")


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a kernel state for inputs of ``dtype``: at least float32 (see the module doc)."""
    return torch.promote_types(dtype, torch.float32)


def _to(x, dtype):
    if x is None:
        return None
    if isinstance(x, tuple):
        return tuple(_to(t, dtype) for t in x)
    return x.to(dtype)


def gated_attention(q, k, v, g=None, *, mode="chunk", initial_state=None, chunk_size=64,
                    backend="auto", normalize=False, eps=1e-6, square_qk=None):
    """Gated linear attention; ``normalize`` divides by sum_j A_ij + eps (state gets V+1 columns).

    ``square_qk``: see ``gla_chunk`` (used by our chunked form only; FLA and the recurrence
    work on q and k themselves)."""
    _check_mode(mode)
    vv = append_ones(v) if normalize else v
    sd = state_dtype(q.dtype)
    if mode == "recurrent":
        o, s = gla_recurrent(*_to((q, k, vv, g, initial_state), sd))
        o = o.to(torch.promote_types(q.dtype, v.dtype))
    elif use_fla(backend, q.device, "gated linear attention", key_dim=q.shape[-1],
                 dtype=fla_dtype(q, k, v), fla_dtypes=FLA_GATED_DTYPES):
        o, s = fla_gated(q, k, vv, g, initial_state)
    else:
        o, s = gla_chunk(q, k, vv, g, initial_state, chunk_size, square_qk=square_qk)
    return (split_normaliser(o, eps) if normalize else o), s.to(sd)


def gated_matrix(q, k, g=None, *, chunk_size=64, normalize=False, eps=1e-6):
    a = gla_matrix(q, k, g, chunk_size)
    return a / (a.sum(-1, keepdim=True) + eps) if normalize else a


def delta_rule(q, k, v, beta, *, mode="chunk", initial_state=None, chunk_size=64, backend="auto"):
    """The delta rule. FLA's chunk_delta_rule takes fp16/bf16 only: in float32 (no autocast)
    backend="auto" runs the project's chunked kernel, which is exact in float32, rather than
    rounding the user's float32 model to bf16 behind their back; backend="fla" raises."""
    _check_mode(mode)
    sd = state_dtype(q.dtype)
    if mode == "recurrent":
        o, s = delta_recurrent(*_to((q, k, v, beta, initial_state), sd))
        o = o.to(torch.promote_types(q.dtype, v.dtype))
    elif use_fla(backend, q.device, "the delta rule", key_dim=q.shape[-1],
                 dtype=fla_dtype(q, k, v), fla_dtypes=FLA_DELTA_DTYPES):
        o, s = fla_delta(q, k, v, beta, initial_state)
    else:
        o, s = delta_chunk(q, k, v, beta, initial_state, chunk_size)
    return o, s.to(sd)


def mlstm(q, k, v, lf, ig, *, mode="chunk", initial_state=None, chunk_size=64, backend="auto"):
    _check_mode(mode)
    use_fla(backend, q.device, "mLSTM", fla_has_op=False)  # raises if FLA is forced
    sd = state_dtype(q.dtype)
    if mode == "recurrent":
        o, s = mlstm_recurrent(*_to((q, k, v, lf, ig, initial_state), sd))
        o = o.to(torch.promote_types(q.dtype, v.dtype))
    else:
        # the chunked form computes in the inputs' dtype, as gla_chunk and delta_chunk do
        o, s = mlstm_chunk(q, k, v, lf, ig, _to(initial_state, q.dtype), chunk_size)
    return o, _to(s, sd)


__all__ = [
    "append_ones", "delta_chunk", "delta_matrix", "delta_recurrent", "delta_rule", "delta_step",
    "delta_step_fused", "gated_attention", "gated_matrix", "gla_chunk", "gla_matrix", "gla_recurrent",
    "gla_step", "gla_step_fused", "mlstm", "mlstm_chunk", "mlstm_matrix", "mlstm_recurrent", "mlstm_step",
    "mlstm_step_fused", "segsum",
    "split_normaliser", "state_dtype", "use_fla",
]
