"""Codecs: the one owner of the wire format (record -> :class:`Envelope` -> :class:`IncomingMessage`).

``get_codec("native")`` returns outboxkit's own format; ``cloudevents`` (CloudEvents 1.0, binary
content mode: :class:`~outbox.transports._cloudevents.CloudEventsCodec`) and ``debezium`` (the
layout of Debezium's outbox event router: :class:`~outbox.transports._debezium.DebeziumCodec`) are
built in too, loaded on first use. Other codecs register with :func:`register_codec`.

:func:`reserved_header_names` is the union of every registered codec's reserved header names: the
writer refuses user headers with those names (case-insensitively), whichever codec a relay uses.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..ids import uuid_text
from ..incoming import IncomingMessage, header_text
from ..message import OutboxRecord
from .base import BINDINGS, CONTENT_TYPE_HEADER, MESSAGE_ID_HEADER, Codec, Envelope

if TYPE_CHECKING:  # loaded on first use (module __getattr__): their modules import this one
    from ._cloudevents import CloudEventsCodec
    from ._debezium import DebeziumCodec

__all__ = ["NATIVE", "CloudEventsCodec", "DebeziumCodec", "NativeCodec", "codec_names", "get_codec",
           "is_reserved_header", "register_codec", "reserved_by", "reserved_header_names"]

#: Row attributes the native codec carries: (attribute, Kafka header, AMQP property or None for a header there too).
_NATIVE_ATTRS = (
    ("type", "message-type", "type"),
    ("correlation_id", "correlation-id", "correlation_id"),
    ("app_id", "app-id", "app_id"),
    ("traceparent", "traceparent", None),
    ("tracestate", "tracestate", None),
)
_OWN_KAFKA = frozenset({MESSAGE_ID_HEADER, CONTENT_TYPE_HEADER, *(h for _a, h, _p in _NATIVE_ATTRS)})
_OWN_AMQP = frozenset({MESSAGE_ID_HEADER, *(h for _a, h, p in _NATIVE_ATTRS if p is None)})


def check_binding(binding: str) -> None:
    """Raise :class:`~outbox.errors.ConfigurationError` unless ``binding`` is one of :data:`BINDINGS` (every codec)."""
    if binding not in BINDINGS:
        raise ConfigurationError(f"unknown codec binding {binding!r}; known: {', '.join(BINDINGS)}")


class NativeCodec:
    """outboxkit's own wire format.

    Kafka: value = payload, key = the record's key (UTF-8), headers = the record's headers plus
    ``message-id`` (the outbox message id) and ``content-type`` (when set); timestamp = ``created_at``.
    AMQP: body = payload, routing key = key (``""`` for none), headers table = the record's headers
    plus ``message-id``; properties ``message_id``, ``content_type``, ``delivery_mode=2``;
    ``timestamp`` = ``created_at`` (whole seconds).

    A row's attributes, when it has them: ``type``, ``correlation_id`` and ``app_id`` go to the AMQP
    properties of those names, and on Kafka to the headers ``message-type``, ``correlation-id`` and
    ``app-id``; the W3C trace context to ``traceparent`` / ``tracestate`` headers on both. Decoding
    reads them back into :attr:`~outbox.incoming.IncomingMessage.attributes`.
    """

    name = "native"

    def reserved(self, binding: str) -> frozenset[str]:
        check_binding(binding)
        return _OWN_KAFKA if binding == "kafka" else _OWN_AMQP

    def encode(self, record: OutboxRecord, binding: str) -> Envelope:
        mid = uuid_text(record.message_id)
        # (the relay's per-message path: one dict copy, no comprehension, for the usual row without our names)
        headers: dict[str, str | bytes] = dict(record.headers) if record.headers else {}
        if binding == "kafka":
            headers.pop(CONTENT_TYPE_HEADER, None)
            headers[MESSAGE_ID_HEADER] = mid  # replaces a user's own message-id
            if record.content_type:
                headers[CONTENT_TYPE_HEADER] = record.content_type
            attrs = record.attributes
            if attrs:
                for attr, header, _prop in _NATIVE_ATTRS:
                    value = attrs.get(attr)
                    if value:
                        headers[header] = value
            return Envelope(record.topic, record.key, record.payload, headers, record.created_at, {})
        if binding == "amqp":
            headers[MESSAGE_ID_HEADER] = mid
            props: dict[str, Any] = {"delivery_mode": 2, "message_id": mid, "content_type": record.content_type}
            attrs = record.attributes
            if attrs:
                for attr, header, prop in _NATIVE_ATTRS:
                    value = attrs.get(attr)
                    if value:
                        if prop is None:
                            headers[header] = value
                        else:
                            props[prop] = value
            return Envelope(record.topic, record.key, record.payload, headers, record.created_at, props)
        check_binding(binding)
        raise AssertionError  # unreachable

    def decode(self, envelope: Envelope, binding: str) -> IncomingMessage:
        headers = {header_text(k): header_text(v) for k, v in envelope.headers.items() if v is not None}
        key = envelope.key
        props = envelope.properties
        if binding == "kafka":
            content_type = headers.get(CONTENT_TYPE_HEADER)
        else:
            ctype = props.get("content_type")
            content_type = header_text(ctype) if isinstance(ctype, (bytes, str)) else None
        if binding == "kafka":
            attributes = {a: headers[h] for a, h, _p in _NATIVE_ATTRS if h in headers}
        else:
            attributes = {a: header_text(props[p]) if p is not None else headers[h] for a, h, p in _NATIVE_ATTRS
                          if (props.get(p) is not None if p is not None else h in headers)}
        return IncomingMessage(
            id=None,
            topic=header_text(envelope.topic),
            key=header_text(key) if isinstance(key, (bytes, bytearray, str)) else None,
            payload=envelope.payload,
            headers=headers,
            content_type=content_type,
            partition=envelope.partition,
            offset=envelope.offset,
            delivery_tag=envelope.delivery_tag,
            redelivered=envelope.redelivered,
            raw=envelope.raw,
            attributes=attributes,
        )


NATIVE = NativeCodec()

#: name -> codec, or ``"module:attribute"`` of a built-in loaded on first use (its module imports this one)
_codecs: dict[str, Codec | Any] = {
    "native": NATIVE,
    "cloudevents": "outbox.transports._cloudevents:CLOUDEVENTS",
    "debezium": "outbox.transports._debezium:DEBEZIUM",
}
_LAZY_CLASSES = {"CloudEventsCodec": "outbox.transports._cloudevents", "DebeziumCodec": "outbox.transports._debezium"}


def __getattr__(name: str) -> Any:
    module = _LAZY_CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def _load(name: str) -> Codec:
    codec = _codecs[name]
    if isinstance(codec, str):
        import importlib

        module, _, attr = codec.partition(":")
        codec = _codecs[name] = getattr(importlib.import_module(module), attr)
    return codec


def register_codec(codec: Codec) -> None:
    """Make ``codec`` available to :func:`get_codec` (and ``--codec``) under ``codec.name``."""
    name = getattr(codec, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigurationError("a codec needs a non-empty str name")
    global _reserved
    _codecs[name] = codec
    _reserved = None


def codec_names() -> list[str]:
    """The registered codec names, sorted."""
    return sorted(_codecs)


def get_codec(name: str | Codec | None, **options: Any) -> Codec:
    """The codec registered as ``name`` (a codec object is returned as it is; ``None`` -> native).

    ``options`` (``None`` values left out) go to the codec's ``configure(**options)``, which returns
    a codec so configured; ``get_codec("cloudevents", source="/billing")``. A codec without
    ``configure`` takes no options, and they are ignored: a relay passes its ``ce_source`` whatever
    its codec.
    """
    if name is None:
        codec: Codec = NATIVE
    elif not isinstance(name, str):
        codec = name
    else:
        try:
            codec = _load(name)
        except KeyError:
            raise ConfigurationError(f"unknown codec {name!r}; known: {', '.join(codec_names())}") from None
    given = {k: v for k, v in options.items() if v is not None}
    configure = getattr(codec, "configure", None) if given else None
    return configure(**given) if configure is not None else codec


_reserved: tuple[frozenset[str], frozenset[str], tuple[str, ...]] | None = None
"""(all names, exact names, prefixes) of every registered codec; recomputed after a registration."""


def _reserved_sets() -> tuple[frozenset[str], frozenset[str], tuple[str, ...]]:
    global _reserved
    cached = _reserved
    if cached is None:
        names: set[str] = set()
        for name in list(_codecs):
            codec = _load(name)
            for binding in BINDINGS:
                names.update(n.lower() for n in codec.reserved(binding))
        exact = frozenset(n for n in names if not n.endswith("*"))
        prefixes = tuple(sorted(n[:-1] for n in names if n.endswith("*")))
        cached = _reserved = (frozenset(names), exact, prefixes)
    return cached


def reserved_header_names() -> frozenset[str]:
    """Lower-case header names some registered codec writes or reads, for every binding.

    A name ending in ``*`` stands for every name with that prefix (``ce_*``). The writer refuses a
    user header whose lower-cased name is one of them (see :func:`is_reserved_header`).
    """
    return _reserved_sets()[0]


def is_reserved_header(header: str) -> bool:
    """Whether some registered codec reserves ``header``, compared case-insensitively (cheap: for ``add()``)."""
    _, exact, prefixes = _reserved_sets()
    low = header.lower()
    return low in exact or low.startswith(prefixes)


def reserved_by(header: str) -> str | None:
    """The name of a registered codec that reserves ``header`` (case-insensitively), or ``None``.

    ``reserved_by("Message-Id") == "native"``, ``reserved_by("ce_type") == "cloudevents"``.
    """
    low = header.lower()
    for name in sorted(_codecs, key=lambda n: (n != "native", n)):
        codec = _load(name)
        for binding in BINDINGS:
            for reserved in codec.reserved(binding):
                if low == reserved or (reserved.endswith("*") and low.startswith(reserved[:-1])):
                    return name
    return None


def utc_seconds(stamp: dt.datetime | None) -> int | None:
    """Whole seconds since the epoch of an aware datetime (the AMQP ``timestamp`` property)."""
    return None if stamp is None else int(stamp.timestamp())
