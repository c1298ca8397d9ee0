"""Registry of student token mixers (what users type as ``-p arch NAME``).

``available()`` lists the names, ``spec(name)`` says what the mixer declares (query, key,
decay kind, kernel family, paper), ``get(name)`` returns the mixer class (a ``TokenMixer``
subclass). The registry is the classes themselves (:mod:`.registry`): each module below
registers its class with ``@register``, so adding a mixer is one module plus one line here.
"""
from __future__ import annotations

from .base import CoreOut, MixerConfig, TokenMixer
from .registry import ALIASES, MixerSpec, available, get, register, spec, unregister

# One line per mixer; the order here is the order of available() (the paper's Table 1).
from . import softmax  # noqa: E402,F401
from . import xlstm  # noqa: E402,F401
from . import gla  # noqa: E402,F401
from . import hgrn2  # noqa: E402,F401
from . import retnet  # noqa: E402,F401
from . import mamba2  # noqa: E402,F401
from . import metala  # noqa: E402,F401
from . import deltanet  # noqa: E402,F401
from . import rebased  # noqa: E402,F401
from . import hedgehog  # noqa: E402,F401


def build(name: str, config: MixerConfig, layer_idx: int = 0) -> TokenMixer:
    return get(name)(config, layer_idx)


__all__ = ["ALIASES", "CoreOut", "MixerConfig", "MixerSpec", "TokenMixer", "available", "build", "get",
           "register", "spec", "unregister"]
