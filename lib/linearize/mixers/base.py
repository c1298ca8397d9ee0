"""The contract every token mixer (student attention replacement) follows.

A mixer replaces one teacher attention block. It sees the layer's normed hidden states
x [B, T, hidden] and returns y [B, T, hidden] plus a recurrent state for generation.

Every mixer has three forms of the same function, all built on ``linearize.kernels``:

* ``mode="chunk"``      chunked parallel form for training; memory O(T * chunk), not O(T^2).
* ``mode="recurrent"``  token-by-token recurrence on a constant-size state (generation).
* ``mixing_matrix(x)``  the materialised mixing matrix A [B, H, T, T] (differentiable) such
                        that ``core(x).o == A @ core(x).v`` - i.e. the kernel output *before*
                        output norm / output gate / output projection is A applied to values.

Head layout: students keep the teacher's query-head count H and head dim; where the teacher
uses grouped-query attention, K/V heads are repeated as in Llama's ``repeat_kv``
(query head h reads KV head h // (H // H_kv)). So A has the teacher's H heads and stage-1
alignment compares head h with teacher head h.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

Mode = Literal["chunk", "recurrent"]
Decay = Literal["none", "static-scalar", "dynamic-scalar", "dynamic-channel", "delta"]


@dataclass
class MixerConfig:
    """Shapes a mixer needs, taken from the teacher, plus mixer-specific options."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    chunk_size: int = 64
    # force a backend: "auto" = FLA Triton on CUDA where FLA has the op, ours otherwise
    backend: Literal["auto", "torch", "fla"] = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CoreOut:
    """Kernel output before output norm/gate/projection, and the values it mixed."""

    o: torch.Tensor  # [B, H, T, Dv]
    v: torch.Tensor  # [B, H, T, Dv]


class TokenMixer(nn.Module):
    """Base class; subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    has_query: ClassVar[bool] = True
    has_key: ClassVar[bool] = True
    decay: ClassVar[Decay] = "none"
    # human-readable meaning of A when the mixer is not plainly linear in V (normalisers ...)
    matrix_note: ClassVar[str] = ""
    # why a Llama projection has no counterpart here, e.g. {"k_proj": "no key: k = 1 - f"}
    copy_skips: ClassVar[dict[str, str]] = {}
    # the keys of ``MixerConfig.options`` this class reads (``mixer_options`` is checked
    # against the union over the class hierarchy, see ``declared_options``)
    option_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def declared_options(cls) -> set[str]:
        return {n for klass in cls.__mro__ for n in vars(klass).get("option_names", ())}
    # whether options["hybrid_window"] > 0 (a softmax window beside the mixer, beyond the paper) works
    supports_hybrid: ClassVar[bool] = False

    def __init__(self, config: MixerConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        if config.options.get("hybrid_window") and not self.supports_hybrid:
            raise ValueError(
                f"the {self.name!r} mixer takes no hybrid window (hybrid_window={config.options['hybrid_window']}): "
                "softmax attention is exact already; the window is for the subquadratic students"
            )

    # --- the three forms -------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        state: dict[str, torch.Tensor] | None = None,
        mode: Mode | None = None,
        keep_state: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """y [B, T, hidden], new state. ``mode=None``: recurrent if a state is given, else chunk.
        ``keep_state=False``: the caller keeps no state (a forward without a cache, training);
        the state returned is None and the mixer may take a form that never builds it.

        ``position_embeddings`` is the (cos, sin) pair the Llama model computes for these
        positions; mixers that use RoPE apply it, others ignore it."""
        raise NotImplementedError

    def core(self, x: torch.Tensor, position_embeddings=None, mode: Mode = "chunk") -> CoreOut:
        raise NotImplementedError

    def mixing_matrix(self, x: torch.Tensor, position_embeddings=None) -> torch.Tensor:
        """A [B, H, T, T], lower triangular, differentiable."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device, dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- conversion from a teacher attention block ------------------------------------
    def copy_from_attention(self, attn: nn.Module, qkv_copy: bool = True) -> list[str]:
        """Copy what this mixer has of the teacher's q/k/v/o projections.

        Returns human-readable notes of what was copied and what was skipped (e.g.
        "no key projection: k_proj not copied") so the converter can report them.
        ``qkv_copy=False`` copies nothing (the paper's Table 2 setting): the mixer keeps its
        own initialisation. Projections are matched by name (q_proj, k_proj, v_proj, o_proj)."""
        if not qkv_copy:
            return ["qkv_copy=False: no projection copied, the mixer keeps its own initialisation"]
        from .common import copy_linear_by_name

        return copy_linear_by_name(self, attn, ("q_proj", "k_proj", "v_proj", "o_proj"), self.copy_skips)
