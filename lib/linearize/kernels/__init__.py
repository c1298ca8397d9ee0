"""Token-mixing kernels in pure PyTorch, one family per kind of recurrence, with FLA dispatch.

Families (each with a chunked form, a recurrent step and a materialised mixing matrix):
* ``gated``  gated linear attention: per-channel, scalar or no decay (+ optional normaliser)
* ``delta``  the delta rule (DeltaNet)
* ``mlstm``  xLSTM's mLSTM cell with its max-state stabiliser

The three entry points below pick the form (``mode``) and the backend; mixers call these.
All take [B, H, T, D] tensors and return (o, final state).
"""
from __future__ import annotations

from .delta import delta_chunk, delta_matrix, delta_recurrent, delta_step
from .dispatch import fla_delta, fla_gated, use_fla
from .gated import (append_ones, gla_chunk, gla_matrix, gla_recurrent, gla_step, segsum,
                    split_normaliser)
from .mlstm import mlstm_chunk, mlstm_matrix, mlstm_recurrent, mlstm_step

MODES = ("chunk", "recurrent")


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def gated_attention(q, k, v, g=None, *, mode="chunk", initial_state=None, chunk_size=64,
                    backend="auto", normalize=False, eps=1e-6, square_qk=None):
    """Gated linear attention; ``normalize`` divides by sum_j A_ij + eps (state gets V+1 columns).

    ``square_qk``: see ``gla_chunk`` (used by our chunked form only; FLA and the recurrence
    work on q and k themselves)."""
    _check_mode(mode)
    vv = append_ones(v) if normalize else v
    if mode == "recurrent":
        o, s = gla_recurrent(q, k, vv, g, initial_state)
    elif use_fla(backend, q.device, "gated linear attention", key_dim=q.shape[-1]):
        o, s = fla_gated(q, k, vv, g, initial_state)
    else:
        o, s = gla_chunk(q, k, vv, g, initial_state, chunk_size, square_qk=square_qk)
    return (split_normaliser(o, eps) if normalize else o), s


def gated_matrix(q, k, g=None, *, chunk_size=64, normalize=False, eps=1e-6):
    a = gla_matrix(q, k, g, chunk_size)
    return a / (a.sum(-1, keepdim=True) + eps) if normalize else a


def delta_rule(q, k, v, beta, *, mode="chunk", initial_state=None, chunk_size=64, backend="auto"):
    _check_mode(mode)
    if mode == "recurrent":
        return delta_recurrent(q, k, v, beta, initial_state)
    if use_fla(backend, q.device, "the delta rule", key_dim=q.shape[-1]):
        return fla_delta(q, k, v, beta, initial_state)
    return delta_chunk(q, k, v, beta, initial_state, chunk_size)


def mlstm(q, k, v, lf, ig, *, mode="chunk", initial_state=None, chunk_size=64, backend="auto"):
    _check_mode(mode)
    use_fla(backend, q.device, "mLSTM", fla_has_op=False)  # raises if FLA is forced
    if mode == "recurrent":
        return mlstm_recurrent(q, k, v, lf, ig, initial_state)
    return mlstm_chunk(q, k, v, lf, ig, initial_state, chunk_size)


__all__ = [
    "append_ones", "delta_chunk", "delta_matrix", "delta_recurrent", "delta_rule", "delta_step",
    "gated_attention", "gated_matrix", "gla_chunk", "gla_matrix", "gla_recurrent", "gla_step",
    "mlstm", "mlstm_chunk", "mlstm_matrix", "mlstm_recurrent", "mlstm_step", "segsum",
    "split_normaliser", "use_fla",
]
