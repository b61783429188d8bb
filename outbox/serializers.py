"""Turning payloads into bytes (writer) and back (consumers).

The default :class:`JSONSerializer` takes ``bytes`` (sent as is), ``str`` (UTF-8 text), dataclasses,
pydantic models and anything :func:`json.dumps` accepts (plus ``datetime``, ``date``, ``UUID`` and
``Decimal``). Write your own by implementing :class:`Serializer`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
import uuid
from typing import Any, Protocol, runtime_checkable

from .errors import DecodeError, SerializationError

__all__ = [
    "CONTENT_TYPE_BYTES",
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_TEXT",
    "JSONSerializer",
    "Serializer",
]

CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_TEXT = "text/plain; charset=utf-8"
CONTENT_TYPE_BYTES = "application/octet-stream"


@runtime_checkable
class Serializer(Protocol):
    """Turns a payload into ``(bytes, content_type)`` and back."""

    def serialize(self, payload: Any) -> tuple[bytes, str]: ...

    def deserialize(self, data: bytes, content_type: str | None) -> Any: ...


def _default(obj: Any) -> Any:
    if isinstance(obj, (dt.datetime, dt.date, dt.time)):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    dump = getattr(obj, "model_dump", None)  # pydantic v2
    if callable(dump):
        return dump(mode="json")
    if isinstance(obj, (set, frozenset)):
        raise TypeError(f"a {type(obj).__name__} has no order and no JSON form; pass a sorted list")
    raise TypeError(f"object of type {type(obj).__qualname__!r} is not JSON-serialisable")


class JSONSerializer:
    """bytes pass through, str becomes UTF-8 text, everything else becomes JSON."""

    def __init__(self, *, sort_keys: bool = False) -> None:
        self.sort_keys = sort_keys

    def serialize(self, payload: Any) -> tuple[bytes, str]:
        if isinstance(payload, (bytes, bytearray, memoryview)):
            return bytes(payload), CONTENT_TYPE_BYTES
        if isinstance(payload, str):
            return payload.encode("utf-8"), CONTENT_TYPE_TEXT
        dump_json = getattr(payload, "model_dump_json", None)
        if callable(dump_json) and not isinstance(payload, type):
            return dump_json().encode("utf-8"), CONTENT_TYPE_JSON
        try:
            text = json.dumps(
                payload, default=_default, ensure_ascii=False, separators=(",", ":"), sort_keys=self.sort_keys,
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"cannot serialise payload of type {type(payload).__qualname__!r}: {exc}. "
                "Pass bytes, str, a dataclass, a pydantic model or JSON-compatible data, "
                "or configure a Serializer"
            ) from None
        return text.encode("utf-8"), CONTENT_TYPE_JSON

    def deserialize(self, data: bytes, content_type: str | None) -> Any:
        ct = (content_type or CONTENT_TYPE_BYTES).split(";")[0].strip().lower()
        try:
            if ct == "application/json" or ct.endswith("+json"):
                return json.loads(data)
            if ct.startswith("text/"):
                return data.decode("utf-8")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"payload is not valid {ct}: {exc}") from None
        return bytes(data)
