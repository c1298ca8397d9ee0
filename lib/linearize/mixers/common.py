"""Pieces several mixers share: head reshaping, GQA repeat, RoPE, short convolutions, copying.

Kept here once so the mixer modules only hold what makes each mixer different.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]."""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H, T, D]; query head h reads KV head h // (H // H_kv), as Llama."""
    h_kv = x.shape[1]
    if h_kv == num_heads:
        return x
    if num_heads % h_kv:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={h_kv}")
    return x.repeat_interleave(num_heads // h_kv, dim=1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Rotate x [B, H, T, D] with the (cos, sin) pair [B, T, D] that Llama's rotary module gives."""
    if position_embeddings is None:
        raise ValueError(
            "this mixer applies RoPE but got position_embeddings=None; pass the (cos, sin) pair "
            "from the model's rotary embedding, or set options['rope']=False"
        )
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, with its last (width-1) inputs as the state.

    The same code serves the chunked and the recurrent form (a step is a length-1 call with
    the cached window), so both forms agree by construction. ``init="identity"`` starts the
    filter as a pass-through (last tap 1), so copied teacher projections keep their meaning
    at the start of distillation; ``"default"`` is PyTorch's Conv1d initialisation.
    """

    def __init__(self, channels: int, width: int = 4, activation: str | None = "silu",
                 init: str = "identity"):
        super().__init__()
        if width < 1:
            raise ValueError(f"short convolution width must be >= 1, got {width}")
        self.channels, self.width, self.activation = channels, width, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        if init == "identity":
            nn.init.zeros_(self.weight)
            with torch.no_grad():
                self.weight[:, 0, -1] = 1.0
        elif init == "default":
            nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        else:
            raise ValueError(f"conv init must be 'identity' or 'default', got {init!r}")

    def init_state(self, batch_size: int, device, dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.channels, self.width - 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        """x [B, T, C] -> (y [B, T, C], new cache [B, C, width-1])."""
        b, t, c = x.shape
        xt = x.transpose(1, 2)
        if cache is None:
            cache = self.init_state(b, x.device, x.dtype)
        xx = torch.cat([cache.to(x.dtype), xt], dim=-1)
        if t == 1:
            # a decode step: the window times the filter. F.conv1d's per-call set-up cost
            # (mkldnn) was about half of a deltanet/mamba2 decode step on the CPU.
            y = (xx * self.weight[:, 0].to(x.dtype)).sum(-1, keepdim=True)
        else:
            y = F.conv1d(xx, self.weight.to(x.dtype), groups=c)
        if self.activation == "silu":
            y = F.silu(y)
        elif self.activation is not None:
            raise ValueError(f"unknown short-conv activation {self.activation!r}")
        # clone: a slice would keep the whole [B, C, T + width - 1] input alive as the state
        # (after a T-token prefill, T times the state's real size; found by linearize.bench)
        new_cache = xx[..., xx.shape[-1] - (self.width - 1):].clone()
        return y.transpose(1, 2), new_cache


def copy_linear_by_name(student: nn.Module, teacher: nn.Module, names, reasons=None) -> list[str]:
    """Copy teacher.<name>.weight into student.<name>.weight for each name both have.

    ``reasons`` maps a name the student lacks to why (e.g. "no key projection: k = 1 - f")."""
    reasons = reasons or {}
    notes = []
    for name in names:
        src = getattr(teacher, name, None)
        dst = getattr(student, name, None)
        if dst is None:
            notes.append(f"{name}: not copied ({reasons.get(name, 'the mixer has no such projection')})")
            continue
        if src is None:
            notes.append(f"{name}: not copied (the teacher attention has no {name})")
            continue
        if src.weight.shape != dst.weight.shape:
            raise ValueError(
                f"{name}: teacher weight {tuple(src.weight.shape)} does not fit student "
                f"{tuple(dst.weight.shape)}; the student must keep the teacher's head count and head dim"
            )
        with torch.no_grad():
            dst.weight.copy_(src.weight)
        extra = ""
        if getattr(src, "bias", None) is not None:
            if getattr(dst, "bias", None) is not None:
                with torch.no_grad():
                    dst.bias.copy_(src.bias)
            else:
                extra = " (teacher bias dropped: the student projection has none)"
        notes.append(f"{name}: copied {tuple(src.weight.shape)}{extra}")
    return notes


class HeadNorm(nn.Module):
    """Per-head normalisation of [B, H, T, D] over D ("group norm" with one group per head).

    kind="layer": LayerNorm, kind="rms": RMSNorm; ``affine`` gives each of the H*D channels its
    own weight (and bias for LayerNorm), as xLSTM's multi-head LayerNorm and RetNet's GroupNorm."""

    def __init__(self, num_heads: int, head_dim: int, kind: str = "rms", affine: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"HeadNorm kind must be 'layer' or 'rms', got {kind!r}")
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(num_heads, 1, head_dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, head_dim)) if affine and kind == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * self.weight.to(x.dtype)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x
