"""Transports: one package per broker (publisher, consumer runner, codec binding, options), by name.

``get("kafka")`` returns the :class:`~outbox.transports.base.Transport` registered under that name.
The built-ins are ``kafka``, ``rabbitmq`` and ``memory``; a third-party package adds one with an
entry point in the group ``outboxkit.transports``::

    [project.entry-points."outboxkit.transports"]
    nats = "outboxkit_nats:TRANSPORT"

or at run time with :func:`register`. Importing this module imports no broker client library.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any

from ..errors import ConfigurationError
from .base import (
    CONTENT_TYPE_HEADER,
    MESSAGE_ID_HEADER,
    Codec,
    Envelope,
    Outcome,
    Publisher,
    PublishResult,
    Transport,
)

__all__ = [
    "CONTENT_TYPE_HEADER",
    "ENTRY_POINT_GROUP",
    "MESSAGE_ID_HEADER",
    "Codec",
    "Envelope",
    "Outcome",
    "PublishResult",
    "Publisher",
    "Transport",
    "get",
    "names",
    "register",
]

#: The entry point group third-party transports register under (value ``"pkg.module:OBJECT"``).
ENTRY_POINT_GROUP = "outboxkit.transports"

#: Built-ins, found even from a source checkout that was never installed (no entry points then).
_BUILTIN = {
    "kafka": "outbox.transports.kafka:TRANSPORT",
    "memory": "outbox.transports.memory:TRANSPORT",
    "rabbitmq": "outbox.transports.rabbitmq:TRANSPORT",
}

_lock = threading.Lock()
_registered: dict[str, Callable[[], Any] | Any] = {}
_loaded: dict[str, Transport] = {}


def register(name: str, factory: Callable[[], Any] | Any) -> None:
    """Register a transport under ``name``: the transport object itself, or a no-argument callable
    returning it (called on first :func:`get`). Replaces an earlier registration of the name."""
    if not isinstance(name, str) or not name.strip() or name != name.strip().lower():
        raise ConfigurationError(f"a transport name must be a non-empty lower-case string, got {name!r}")
    with _lock:
        _registered[name] = factory
        _loaded.pop(name, None)


def _entry_points() -> dict[str, str]:
    try:
        found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken distribution on sys.path must not break the built-ins
        return {}
    return {ep.name: ep.value for ep in found}


def _spec_table() -> dict[str, str]:
    return {**_BUILTIN, **_entry_points()}


def names() -> list[str]:
    """Every transport name that :func:`get` accepts, sorted."""
    return sorted({*_spec_table(), *_registered})


def _load_spec(name: str, spec: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"transport {name!r} ({spec}) cannot be loaded: {exc}") from None
    return obj


def get(name: str) -> Transport:
    """The transport registered as ``name``; :class:`~outbox.errors.ConfigurationError` listing the
    registered names when there is none."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        factory = _registered.get(name)
    if factory is None:
        spec = _spec_table().get(name) if isinstance(name, str) else None
        if spec is None:
            raise ConfigurationError(f"unknown transport {name!r}; registered: {', '.join(names())}")
        factory = _load_spec(name, spec)
    obj = factory() if callable(factory) and not _is_transport(factory) else factory
    if not _is_transport(obj):
        raise ConfigurationError(f"transport {name!r} is not a Transport (needs name, binding, options, "
                                 f"publisher() and runner()), got {type(obj).__name__}")
    with _lock:
        _loaded[name] = obj
    return obj


def _is_transport(obj: Any) -> bool:
    return not isinstance(obj, type) and all(hasattr(obj, a) for a in ("name", "binding", "publisher", "runner"))
