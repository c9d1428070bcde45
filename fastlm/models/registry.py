"""Architectures by name: `model.arch` picks one, fastlm.models.build(config) makes it.

An architecture module registers its class once:

    @register("lstm", "gru", summary="recurrent LM over torch's fused nn.LSTM / nn.GRU")
    class RNNLM(LanguageModel): ...

The class is built as cls(config); config.validate() calls check_config(config), so a model
with its own constraints defines a classmethod check_config that raises ConfigError.

The table is full whenever this module can be reached: Python runs fastlm/models/__init__.py,
which imports every architecture module, before any `fastlm.models.*` import returns. So this
module imports no architecture (they import it, to register) and no config (fastlm.config reads
it to check model.arch).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastlm.errors import ConfigError

_ARCHS: dict[str, Architecture] = {}


@dataclass(frozen=True)
class Architecture:
    name: str
    cls: type
    summary: str


def register(*names: str, summary: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        for name in names:
            if name in _ARCHS and _ARCHS[name].cls is not cls:
                raise ValueError(f"model.arch {name!r} is registered twice "
                                 f"({_ARCHS[name].cls.__name__} and {cls.__name__})")
            _ARCHS[name] = Architecture(name, cls, summary)
        return cls
    return add


def available() -> list[str]:
    """Registered model.arch names, in registration order."""
    return list(_ARCHS)


def get(name: str) -> Architecture:
    if name not in _ARCHS:
        raise ConfigError(f"model.arch: must be one of {', '.join(_ARCHS)}; got {name!r}")
    return _ARCHS[name]


def build(config):
    """The model config.arch names, built from config (checked first)."""
    return get(config.arch).cls(config)
