"""Registry of student token mixers (what users type as ``-p arch NAME``).

``available()`` lists the names, ``spec(name)`` says what the mixer has (query, key, decay kind)
without importing it, ``get(name)`` returns the mixer class (a ``TokenMixer`` subclass)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .base import CoreOut, MixerConfig, TokenMixer


@dataclass(frozen=True)
class MixerSpec:
    name: str
    module: str  # module under linearize.mixers
    cls: str
    family: str  # kernel family: softmax | gated | delta | mlstm
    has_query: bool
    has_key: bool
    decay: str  # none | static-scalar | dynamic-scalar | dynamic-channel | delta
    paper: str


_SPECS = [
    MixerSpec("softmax", "softmax", "SoftmaxAttention", "softmax", True, True, "none",
              "Llama softmax attention (Touvron et al. 2023)"),
    MixerSpec("xlstm", "xlstm", "MLSTM", "mlstm", True, True, "dynamic-scalar",
              "mLSTM cell of xLSTM (Beck et al. 2024)"),
    MixerSpec("gla", "gla", "GLA", "gated", True, True, "dynamic-channel",
              "Gated Linear Attention (Yang et al. 2023)"),
    MixerSpec("hgrn2", "hgrn2", "HGRN2", "gated", True, False, "dynamic-channel",
              "HGRN2 (Qin et al. 2024)"),
    MixerSpec("retnet", "retnet", "RetNet", "gated", True, True, "static-scalar",
              "RetNet multi-scale retention (Sun et al. 2023)"),
    MixerSpec("mamba2", "mamba2", "Mamba2", "gated", True, True, "dynamic-scalar",
              "Mamba-2 SSD (Dao & Gu 2024)"),
    MixerSpec("metala", "metala", "MetaLA", "gated", True, False, "dynamic-channel",
              "MetaLA (Chou et al. 2024)"),
    MixerSpec("deltanet", "deltanet", "DeltaNet", "delta", True, True, "delta",
              "DeltaNet (Schlag et al. 2021; Yang et al. 2024)"),
    MixerSpec("rebased", "rebased", "ReBased", "gated", True, True, "none",
              "ReBased (Aksenov et al. 2024)"),
    MixerSpec("hedgehog", "hedgehog", "Hedgehog", "gated", True, True, "none",
              "Hedgehog (Zhang et al. 2024)"),
]
_ALIASES = {"llama": "softmax", "mlstm": "xlstm"}
_BY_NAME = {s.name: s for s in _SPECS}


def available() -> list[str]:
    """The registered mixer names (aliases not included)."""
    return [s.name for s in _SPECS]


def spec(name: str) -> MixerSpec:
    key = _ALIASES.get(name, name)
    if key not in _BY_NAME:
        aliases = ", ".join(f"{a} -> {b}" for a, b in _ALIASES.items())
        raise KeyError(f"unknown mixer {name!r}; valid names: {', '.join(available())} (aliases: {aliases})")
    return _BY_NAME[key]


def get(name: str) -> type[TokenMixer]:
    """The mixer class registered under ``name`` (or an alias)."""
    s = spec(name)
    module = importlib.import_module(f"{__name__}.{s.module}")
    return getattr(module, s.cls)


def build(name: str, config: MixerConfig, layer_idx: int = 0) -> TokenMixer:
    return get(name)(config, layer_idx)


__all__ = ["CoreOut", "MixerConfig", "MixerSpec", "TokenMixer", "available", "build", "get", "spec"]
