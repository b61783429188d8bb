"""Codecs: the one owner of the wire format (record -> :class:`Envelope` -> :class:`IncomingMessage`).

``get_codec("native")`` returns outboxkit's own format. Other codecs register with :func:`register_codec`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError
from ..incoming import IncomingMessage, header_text
from ..message import OutboxRecord
from .base import BINDINGS, CONTENT_TYPE_HEADER, MESSAGE_ID_HEADER, TRACEPARENT, TRACESTATE, Codec, Envelope

__all__ = ["NATIVE", "TRACEPARENT", "TRACESTATE", "NativeCodec", "codec_names", "get_codec", "get_trace_headers",
           "put_trace_headers", "register_codec"]

_OWN_KAFKA = frozenset({MESSAGE_ID_HEADER, CONTENT_TYPE_HEADER, TRACEPARENT, TRACESTATE})
_OWN_AMQP = frozenset({MESSAGE_ID_HEADER, TRACEPARENT, TRACESTATE})


def _check_binding(binding: str) -> None:
    if binding not in BINDINGS:
        raise ConfigurationError(f"unknown codec binding {binding!r}; known: {', '.join(BINDINGS)}")


class NativeCodec:
    """outboxkit's own wire format.

    Kafka: value = payload, key = the record's key (UTF-8), headers = the record's headers plus
    ``message-id`` (the outbox message id) and ``content-type`` (when set); timestamp = ``created_at``.
    Both: ``traceparent`` / ``tracestate`` headers when the writer captured a trace context (W3C Trace
    Context names; decoded into ``IncomingMessage.attributes`` under the same names).
    AMQP: body = payload, routing key = key (``""`` for none), headers table = the record's headers
    plus ``message-id``; properties ``message_id``, ``content_type``, ``delivery_mode=2``;
    ``timestamp`` = ``created_at`` (whole seconds).
    """

    name = "native"

    def reserved(self, binding: str) -> frozenset[str]:
        _check_binding(binding)
        return _OWN_KAFKA if binding == "kafka" else _OWN_AMQP

    def encode(self, record: OutboxRecord, binding: str) -> Envelope:
        mid = str(record.message_id)
        # (the relay's per-message path: one dict copy, no comprehension, for the usual row without our names)
        headers: dict[str, str | bytes] = dict(record.headers) if record.headers else {}
        if record.attributes:  # most rows have none: one falsy check on the hot path
            put_trace_headers(headers, record.attributes)
        if binding == "kafka":
            headers.pop(CONTENT_TYPE_HEADER, None)
            headers[MESSAGE_ID_HEADER] = mid  # replaces a user's own message-id
            if record.content_type:
                headers[CONTENT_TYPE_HEADER] = record.content_type
            return Envelope(record.topic, record.key, record.payload, headers, record.created_at, {})
        if binding == "amqp":
            headers[MESSAGE_ID_HEADER] = mid
            props: dict[str, Any] = {"delivery_mode": 2, "message_id": mid, "content_type": record.content_type}
            return Envelope(record.topic, record.key, record.payload, headers, record.created_at, props)
        _check_binding(binding)
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
        attributes = {n: str(props[n]) for n in ("correlation_id", "type", "app_id") if props.get(n) is not None}
        get_trace_headers(headers, attributes)
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


def put_trace_headers(headers: dict[str, str | bytes], attributes: Mapping[str, str]) -> None:
    """Copy the record's W3C trace context (``traceparent``, ``tracestate``) to ``headers``.

    The header names are W3C Trace Context's own, as its HTTP and (draft) AMQP bindings carry them, and
    as OpenTelemetry's Kafka and RabbitMQ instrumentations read them. A ``tracestate`` goes only
    with a ``traceparent`` (W3C: without one it is meaningless). For any codec that keeps these names.
    """
    parent = attributes.get(TRACEPARENT)
    if parent:
        headers[TRACEPARENT] = parent
        state = attributes.get(TRACESTATE)
        if state:
            headers[TRACESTATE] = state


def get_trace_headers(headers: Mapping[str, str], attributes: dict[str, str]) -> None:
    """Copy ``traceparent`` / ``tracestate`` from decoded ``headers`` into ``attributes`` (the consumer's
    span reads them there); header names are matched as written, lower case, as W3C requires."""
    parent = headers.get(TRACEPARENT)
    if parent:
        attributes[TRACEPARENT] = parent
        state = headers.get(TRACESTATE)
        if state:
            attributes[TRACESTATE] = state


NATIVE = NativeCodec()

_codecs: dict[str, Codec | Any] = {"native": NATIVE}


def register_codec(codec: Codec) -> None:
    """Make ``codec`` available to :func:`get_codec` (and ``--codec``) under ``codec.name``."""
    name = getattr(codec, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigurationError("a codec needs a non-empty str name")
    _codecs[name] = codec


def codec_names() -> list[str]:
    """The registered codec names, sorted."""
    return sorted(_codecs)


def get_codec(name: str | Codec | None) -> Codec:
    """The codec registered as ``name`` (a codec object is returned as it is; ``None`` -> native)."""
    if name is None:
        return NATIVE
    if not isinstance(name, str):
        return name
    try:
        return _codecs[name]
    except KeyError:
        raise ConfigurationError(f"unknown codec {name!r}; known: {', '.join(codec_names())}") from None


def utc_seconds(stamp: dt.datetime | None) -> int | None:
    """Whole seconds since the epoch of an aware datetime (the AMQP ``timestamp`` property)."""
    return None if stamp is None else int(stamp.timestamp())
