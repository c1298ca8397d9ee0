"""The shared frame of every recurrent (subquadratic) mixer.

A subclass says what is particular to it in two hooks:
* ``features(x, position_embeddings, state, new_state)`` -> Features: the kernel inputs
  q, k, v [B, H, T, *] and its gates, computed from the layer input; short convolutions read
  their window from ``state`` (None = fresh) and write the new one into ``new_state``.
* ``output(o, x)`` -> y [B, T, hidden]: output norm, output gate, output projection.
This class runs the kernel family (gated / delta / mlstm) in the requested form, so the chunked,
recurrent and materialised forms cannot drift apart between mixers.

A kernel family is a ``KernelFamily`` object with three methods, ``run`` (chunked or recurrent
form), ``matrix`` (the materialised A) and ``init_state``; ``FAMILIES`` maps the names mixers
declare (``family = "delta"``) to them. A new family is one more object there (or a mixer may
set ``family`` to the object itself).

State dict: the kernel state ("S" for gated and delta; "C", "n", "m" for mLSTM) plus one
"conv_<name>" window per short convolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import kernels
from . import hybrid as _hybrid
from .base import CoreOut, MixerConfig, TokenMixer
from .common import ShortConv, apply_rope, merge_heads, repeat_kv, split_heads


@dataclass
class Features:
    q: torch.Tensor  # [B, H, T, K]
    k: torch.Tensor  # [B, H, T, K]
    v: torch.Tensor  # [B, H, T, V]
    g: torch.Tensor | None = None  # gated: log decay [B, H, T, K] or [B, H, T, 1]
    beta: torch.Tensor | None = None  # delta: [B, H, T]
    lf: torch.Tensor | None = None  # mlstm: log forget gate [B, H, T]
    ig: torch.Tensor | None = None  # mlstm: input gate pre-activation [B, H, T]
    diag: torch.Tensor | None = None  # extra self-weight [B, H, T] (Mamba2's D, MetaLA's self-aug)
    out_input: torch.Tensor | None = None  # what output() gates with, if not the layer input


class KernelFamily:
    """One kind of recurrence: its two forms, its materialised matrix and its empty state.

    ``run(mixer, f, mode, state)`` -> (o [B, H, T, V], kernel state dict); ``state`` is the
    mixer's state dict (None = fresh). ``matrix(mixer, f)`` -> A [B, H, T, T].
    ``init_state(mixer, batch_size, device, dtype)`` -> the kernel's part of a fresh state.
    ``mixer`` supplies the options (``config.chunk_size``, ``config.backend``, and for the gated
    family ``normalize`` and ``eps``) and the shapes (``num_heads``, ``key_dim``, ``head_dim``)."""

    name: str = ""

    def run(self, mixer: "LinearMixer", f: Features, mode, state):
        raise NotImplementedError

    def matrix(self, mixer: "LinearMixer", f: Features) -> torch.Tensor:
        raise NotImplementedError

    def init_state(self, mixer: "LinearMixer", batch_size, device, dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class GatedFamily(KernelFamily):
    """Gated linear attention: per-channel, scalar or no decay ``f.g``, optional normaliser."""

    name = "gated"

    def run(self, mixer, f, mode, state):
        o, s = kernels.gated_attention(f.q, f.k, f.v, f.g, mode=mode, chunk_size=mixer.config.chunk_size,
                                       backend=mixer.config.backend,
                                       initial_state=None if state is None else state["S"],
                                       normalize=mixer.normalize, eps=mixer.eps)
        return o, {"S": s}

    def matrix(self, mixer, f):
        return kernels.gated_matrix(f.q, f.k, f.g, chunk_size=mixer.config.chunk_size,
                                    normalize=mixer.normalize, eps=mixer.eps)

    def init_state(self, mixer, batch_size, device, dtype):
        extra = 1 if mixer.normalize else 0  # the normaliser's column
        return {"S": torch.zeros(batch_size, mixer.num_heads, mixer.key_dim, mixer.head_dim + extra,
                                 device=device, dtype=dtype)}


class DeltaFamily(KernelFamily):
    """The delta rule, with write strength ``f.beta``."""

    name = "delta"

    def run(self, mixer, f, mode, state):
        o, s = kernels.delta_rule(f.q, f.k, f.v, f.beta, mode=mode, chunk_size=mixer.config.chunk_size,
                                  backend=mixer.config.backend,
                                  initial_state=None if state is None else state["S"])
        return o, {"S": s}

    def matrix(self, mixer, f):
        return kernels.delta_matrix(f.q, f.k, f.beta)

    def init_state(self, mixer, batch_size, device, dtype):
        return {"S": torch.zeros(batch_size, mixer.num_heads, mixer.key_dim, mixer.head_dim,
                                 device=device, dtype=dtype)}


class MLSTMFamily(KernelFamily):
    """xLSTM's mLSTM cell: log forget gate ``f.lf``, input gate ``f.ig``, max-state stabiliser."""

    name = "mlstm"

    def run(self, mixer, f, mode, state):
        init = None if state is None else (state["C"], state["n"], state["m"])
        o, (c, n, m) = kernels.mlstm(f.q, f.k, f.v, f.lf, f.ig, mode=mode, chunk_size=mixer.config.chunk_size,
                                     backend=mixer.config.backend, initial_state=init)
        return o, {"C": c, "n": n, "m": m}

    def matrix(self, mixer, f):
        return kernels.mlstm_matrix(f.q, f.k, f.lf, f.ig)

    def init_state(self, mixer, batch_size, device, dtype):
        h, dk, dv = mixer.num_heads, mixer.key_dim, mixer.head_dim
        return {"C": torch.zeros(batch_size, h, dk, dv, device=device, dtype=dtype),
                "n": torch.zeros(batch_size, h, dk, device=device, dtype=dtype),
                "m": torch.zeros(batch_size, h, device=device, dtype=dtype)}


FAMILIES: dict[str, KernelFamily] = {f.name: f for f in (GatedFamily(), DeltaFamily(), MLSTMFamily())}


def kernel_family(family: str | KernelFamily) -> KernelFamily:
    """The family object for a name in ``FAMILIES`` (or the object itself)."""
    if isinstance(family, KernelFamily):
        return family
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(FAMILIES)} "
                         "(or set `family` to a KernelFamily object)")
    return FAMILIES[family]


class LinearMixer(TokenMixer):
    family: ClassVar[str | KernelFamily] = "gated"  # a name in FAMILIES (gated | delta | mlstm) or a KernelFamily
    normalize: ClassVar[bool] = False  # gated family: divide by sum_j A_ij + eps
    option_names = ("rope", "norm_eps")
    CONV_OPTIONS = ("conv_size", "conv_init")  # declared by the subclasses that call add_conv
    supports_hybrid: ClassVar[bool] = True  # options["hybrid_window"] > 0 adds a softmax window (mixers.hybrid)

    def __init__(self, config: MixerConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        c = config
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = (
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim)
        if c.num_heads % c.num_kv_heads:
            raise ValueError(f"num_heads={c.num_heads} must be a multiple of num_kv_heads={c.num_kv_heads}")
        self.key_dim = c.head_dim  # feature-map mixers widen it
        self.use_rope = bool(self.option("rope", False))
        self.eps = float(self.option("norm_eps", 1e-6))
        self.convs = nn.ModuleDict()
        # beyond the paper: an exact softmax window beside the linear branch (None = off)
        self.hybrid = _hybrid.build(config, type(self))

    # ---- helpers for subclasses ---------------------------------------------------------
    def option(self, name, default):
        if name not in self.declared_options():  # keeps the declarations params.py checks complete
            raise KeyError(f"{type(self).__name__} reads option {name!r} without declaring it in option_names.")
        return self.config.options.get(name, default)

    def llama_projections(self, q=True, k=True, v=True, o=True):
        """nn.Linear layers with Llama's names and shapes (bias-free), so copying is by name."""
        c = self.config
        if q:
            self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        if k:
            self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        if v:
            self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        if o:
            self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def add_conv(self, name: str, channels: int, activation="silu"):
        width = int(self.option("conv_size", 4))
        if width > 0:
            self.convs[name] = ShortConv(channels, width, activation, self.option("conv_init", "identity"))

    def conv(self, name, x, conv_state, new_state):
        """Apply short conv ``name`` if the mixer has one (conv_size > 0), tracking its window."""
        if name not in self.convs:
            return x
        y, cache = self.convs[name](x, None if conv_state is None else conv_state.get(f"conv_{name}"))
        new_state[f"conv_{name}"] = cache
        return y

    def heads(self, x, kv=False):
        """[B, T, n*D] -> [B, H, T, D]; KV-head tensors are repeated to the H query heads."""
        if kv:
            return repeat_kv(split_heads(x, self.num_kv_heads), self.num_heads)
        return split_heads(x, self.num_heads)

    def rope(self, q, k, position_embeddings):
        if self.use_rope:
            return apply_rope(q, position_embeddings), apply_rope(k, position_embeddings)
        return q, k

    def gate_heads(self, x):
        """[B, T, H] -> [B, H, T]."""
        return x.transpose(1, 2)

    # ---- hooks ----------------------------------------------------------------------------
    def features(self, x, position_embeddings, state, new_state) -> Features:
        raise NotImplementedError

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(merge_heads(o))

    # ---- the three forms ------------------------------------------------------------------
    @property
    def kernel(self) -> KernelFamily:
        return kernel_family(self.family)

    def _run(self, f: Features, mode, state, keep_state: bool = True):
        # keep_state=False lets a mixer skip its final state (ReBased's T x T form); the
        # generic kernels compute it anyway and the forward drops it
        o, kstate = self.kernel.run(self, f, mode, state)
        if f.diag is not None:
            o = o + f.diag.unsqueeze(-1) * f.v
        return o, kstate

    def forward(self, x, position_embeddings=None, state=None, mode=None, keep_state=True):
        mode = mode or ("recurrent" if state is not None else "chunk")
        new_state: dict = {}
        f = self.features(x, position_embeddings, state, new_state)
        o, kstate = self._run(f, mode, state, keep_state)
        new_state.update(kstate)
        out_input = x if f.out_input is None else f.out_input
        if self.hybrid is not None:
            o_window = self.hybrid.attend(self, x, position_embeddings, state, mode, new_state)
            y = self.hybrid.combine(self, o, out_input, o_window)
        else:
            y = self.output(o, out_input)
        return y, (new_state if keep_state else None)

    def core(self, x, position_embeddings=None, mode="chunk") -> CoreOut:
        f = self.features(x, position_embeddings, None, {})
        o, _ = self._run(f, mode, None, keep_state=False)  # the core hands on no state
        if self.hybrid is not None:  # the two kernel outputs mixed (see mixers.hybrid on the values)
            o = self.hybrid.mix(o, self.hybrid.attend(self, x, position_embeddings, None, mode, {}))
        return CoreOut(o=o, v=f.v)

    def mixing_matrix(self, x, position_embeddings=None) -> torch.Tensor:
        a = self.linear_matrix(x, position_embeddings)
        if self.hybrid is not None:
            a = self.hybrid.mix(a, self.hybrid.matrix(self, x, position_embeddings))
        return a

    def linear_matrix(self, x, position_embeddings=None) -> torch.Tensor:
        """The linear branch's A alone (the whole mixing matrix unless the mixer is a hybrid)."""
        f = self.features(x, position_embeddings, None, {})
        a = self.kernel.matrix(self, f)
        if f.diag is not None:
            a = a + torch.diag_embed(f.diag)
        return a

    def init_state(self, batch_size, device, dtype):
        """Zero state for inputs of ``dtype``: conv windows in ``dtype`` (they hold recent inputs),
        the kernel state in ``kernels.state_dtype(dtype)`` (float32 for fp16/bf16, as FLA keeps it)."""
        state = {f"conv_{n}": m.init_state(batch_size, device, dtype) for n, m in self.convs.items()}
        state.update(self.kernel.init_state(self, batch_size, device, kernels.state_dtype(dtype)))
        if self.hybrid is not None:
            state.update(self.hybrid.init_state(batch_size, device, dtype))
        return state

    def copy_from_attention(self, attn, qkv_copy: bool = True) -> list[str]:
        notes = super().copy_from_attention(attn, qkv_copy)
        if self.hybrid is not None:
            notes += self.hybrid.copy_from_attention(attn, qkv_copy)
        return notes


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def scale_of(dim: int) -> float:
    return 1.0 / math.sqrt(dim)
