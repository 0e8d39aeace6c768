"""A registry of named encoders, each carrying its own preprocessing.

>>> from visual_memory.encoders import list_encoders
>>> "efficientnet-lite0" in [e.name for e in list_encoders()]
True

Add an encoder with `register_encoder` (a decorator on a factory) or a
generic scheme (``"hf:..."``, ``"timm:..."``, ``"onnx:..."``) with
`register_scheme`; build one by name with `create_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import EncoderError
from .base import Encoder, EncoderSpec, Preprocess, l2_normalize

__all__ = [
    "Encoder",
    "EncoderInfo",
    "EncoderSpec",
    "Preprocess",
    "create_encoder",
    "l2_normalize",
    "list_encoders",
    "register_encoder",
    "register_scheme",
]


@dataclass(frozen=True)
class EncoderInfo:
    """What `list_encoders` reports about a registered encoder."""

    name: str
    dim: int
    input_size: int
    source: str
    description: str
    available: Callable[[], bool]

    @property
    def weights_available(self) -> bool:
        try:
            return bool(self.available())
        except Exception:
            return False


_REGISTRY: dict[str, tuple[EncoderInfo, Callable[..., Encoder]]] = {}
_SCHEMES: dict[str, Callable[..., Encoder]] = {}
DEFAULT_ENCODER = "efficientnet-lite0"


def register_encoder(
    name: str,
    *,
    dim: int,
    input_size: int,
    source: str,
    description: str = "",
    available: Callable[[], bool] = lambda: True,
) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Register a factory ``f(**kwargs) -> Encoder`` under ``name``."""

    def decorator(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = (EncoderInfo(name, dim, input_size, source, description, available), factory)
        return factory

    return decorator


def register_scheme(prefix: str) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Register a factory ``f(target, **kwargs)`` for names like ``"<prefix>:<target>"``."""

    def decorator(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        _SCHEMES[prefix] = factory
        return factory

    return decorator


def list_encoders(filter: Optional[str] = None) -> list[EncoderInfo]:
    """Registered encoders, sorted by name; ``filter`` is a substring to match."""
    _load_builtin()
    infos = [info for info, _ in _REGISTRY.values()]
    if filter:
        infos = [i for i in infos if filter in i.name]
    return sorted(infos, key=lambda i: i.name)


def create_encoder(name: str = DEFAULT_ENCODER, **kwargs) -> Encoder:
    """Build an encoder by registered name or ``scheme:target``.

    Raises
    ------
    EncoderError
        If the name is unknown (the message lists the known names), or the
        weights cannot be found.
    """
    _load_builtin()
    if not isinstance(name, str) or not name:
        raise EncoderError(f"encoder name must be a non-empty string; got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name][1](**kwargs)
    scheme, sep, target = name.partition(":")
    if sep and scheme in _SCHEMES:
        return _SCHEMES[scheme](target, **kwargs)
    known = ", ".join(sorted(_REGISTRY))
    schemes = ", ".join(f"{s}:<...>" for s in sorted(_SCHEMES)) or "none"
    raise EncoderError(f"unknown encoder {name!r}. Known encoders: {known}. Generic schemes: {schemes}. "
                       "Run `vismem encoders` to list them.")


def _load_builtin() -> None:
    # Imported lazily so that `import visual_memory` does not import torch.
    from . import efficientnet, hf, onnx_file, timm_models  # noqa: F401
