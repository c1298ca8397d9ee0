"""The mixer registry: the classes themselves, registered with ``@register``.

A mixer class declares what the registry reports (``name``, ``has_query``, ``has_key``,
``decay``, ``family``, ``paper``), so nothing is written twice. A module under
``linearize.mixers`` decorates its class with ``@register`` and ``linearize/mixers/__init__.py``
imports the module: those two lines make a new mixer a student everywhere (conversion,
parameters, training, generation, the test suite). ``available()`` keeps the order of
registration, which is the import order in ``__init__.py``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import get_args

from .base import Decay, TokenMixer

# Other names users type for a registered mixer.
ALIASES = {"llama": "softmax", "mlstm": "xlstm"}
_CLASSES: dict[str, type[TokenMixer]] = {}


@dataclass(frozen=True)
class MixerSpec:
    """What a mixer class declares, as one record (read from the class, never written twice)."""

    name: str
    module: str  # the module that defines the class
    cls: str
    family: str  # kernel family: softmax | gated | delta | mlstm (or a family of its own)
    has_query: bool
    has_key: bool
    decay: str  # none | static-scalar | dynamic-scalar | dynamic-channel | delta
    paper: str

    @classmethod
    def of(cls, mixer: type[TokenMixer]) -> "MixerSpec":
        family = getattr(mixer, "family", "")
        return cls(name=mixer.name, module=mixer.__module__, cls=mixer.__qualname__,
                   family=getattr(family, "name", family), has_query=mixer.has_query,
                   has_key=mixer.has_key, decay=mixer.decay, paper=getattr(mixer, "paper", ""))


def register(mixer: type[TokenMixer]) -> type[TokenMixer]:
    """Class decorator: make ``mixer`` available under ``mixer.name``. Returns the class."""
    if not (isinstance(mixer, type) and issubclass(mixer, TokenMixer)):
        raise TypeError(f"register() takes a TokenMixer subclass, got {mixer!r}")
    name = mixer.__dict__.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"{mixer.__qualname__} must set its own `name`: lower-case letters, digits, '_' "
                         f"or '-' (what users type as `-p arch NAME` and a run folder's name); got {name!r}")
    if name in ALIASES:
        raise ValueError(f"mixer name {name!r} is an alias of {ALIASES[name]!r}; choose another name")
    if mixer.decay not in get_args(Decay):
        raise ValueError(f"{mixer.__qualname__}.decay = {mixer.decay!r}; valid: {', '.join(get_args(Decay))}")
    known = _CLASSES.get(name)
    # the same class registered again (a module reloaded) replaces itself; another class may not
    if known is not None and (known.__module__, known.__qualname__) != (mixer.__module__, mixer.__qualname__):
        raise ValueError(f"mixer name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    _CLASSES[name] = mixer
    return mixer


def unregister(name: str) -> None:
    """Remove a registered mixer (tests that register a toy mixer clean up with this)."""
    _CLASSES.pop(name, None)


def available() -> list[str]:
    """The registered mixer names (aliases not included), in registration order."""
    return list(_CLASSES)


def get(name: str) -> type[TokenMixer]:
    """The mixer class registered under ``name`` (or an alias); KeyError lists the valid names."""
    key = ALIASES.get(name, name)
    if key not in _CLASSES:
        aliases = ", ".join(f"{a} -> {b}" for a, b in ALIASES.items())
        raise KeyError(f"unknown mixer {name!r}; valid names: {', '.join(available())} (aliases: {aliases})")
    return _CLASSES[key]


def spec(name: str) -> MixerSpec:
    return MixerSpec.of(get(name))
