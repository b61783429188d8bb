"""The ``cloudevents`` codec: CloudEvents 1.0 in binary content mode.

Every outbox record becomes one CloudEvent whose attributes travel as headers and whose data is
the payload, untouched. What goes where:

========================  ===============================  =========================================
CloudEvents attribute     Kafka header (Kafka binding)     AMQP (RabbitMQ)
========================  ===============================  =========================================
``specversion``           ``ce_specversion: 1.0``          header ``cloudEvents_specversion``
``id``                    ``ce_id``: the outbox message    header ``cloudEvents_id``, and the
                          id (the UUID ``add()`` returned) ``message_id`` property
``source``                ``ce_source``                    header ``cloudEvents_source``
``type``                  ``ce_type``                      header ``cloudEvents_type``, and the
                                                           ``type`` property
``time``                  ``ce_time``: ``created_at``,     header ``cloudEvents_time`` (the same
                          RFC 3339 in UTC                  RFC 3339 string)
``subject`` (optional)    ``ce_subject``                   header ``cloudEvents_subject``
``datacontenttype``       ``content-type``                 the ``content_type`` property
``traceparent`` /         ``ce_traceparent`` /             ``cloudEvents_traceparent`` /
``tracestate``            ``ce_tracestate``, and the       ``cloudEvents_tracestate``, and the
(distributed tracing)     plain W3C ``traceparent`` /      plain ``traceparent`` / ``tracestate``
                          ``tracestate`` headers           headers
``correlationid``         ``ce_correlationid``             ``cloudEvents_correlationid``, and the
(correlation extension)                                    ``correlation_id`` property
``appid`` (extension)     ``ce_appid``                     ``cloudEvents_appid``, and the
                                                           ``app_id`` property
========================  ===============================  =========================================

Sources: the CloudEvents 1.0 specification, its Kafka protocol binding (binary content mode:
``ce_`` + attribute name, ``content-type`` for ``datacontenttype``), its AMQP binding
(application properties ``cloudEvents_`` + attribute name, ``cloudEvents:`` also allowed on
read; ``datacontenttype`` in the content-type property), and the distributed tracing extension
(``traceparent`` / ``tracestate`` attributes, which carry the same values as the protocol's own
trace headers on a single hop). On RabbitMQ (AMQP 0-9-1) the AMQP 1.0 application properties are
the message's headers table, as the CloudEvents SDKs map them.

``source`` and ``type`` come from the row's attributes (``Outbox(source=...)``, ``add(type=...,
source=...)``); a row without them gets the codec's default source (``--ce-source``, default
``/outboxkit``) and its topic as the type. A row's ``correlation_id`` becomes the ``correlationid``
attribute (the CloudEvents correlation extension) and its ``app_id`` the ``appid`` extension
attribute. The row's own headers travel unchanged beside them; one whose name the codec owns
(``ce_*``, ``content-type``, ``traceparent``, ... see :meth:`CloudEventsCodec.reserved`) is
dropped, so a message never carries two values for one attribute (the writer refuses such
headers in new rows).

Decoding reads ``ce_`` headers on Kafka; ``cloudEvents_``, ``cloudEvents:`` and ``ce-`` (the
knative RabbitMQ binding, which the Python SDK's ``rabbitmq`` module writes) headers on AMQP, the
names case-insensitively. The attributes found land in
:attr:`~outbox.incoming.IncomingMessage.attributes` by their CloudEvents names (``type``,
``source``, ``time``, ``subject``, ``id``, ``specversion``, extensions); headers stay as
received. Decode leaves ``IncomingMessage.id`` unset, as every codec does: the consumer's id
sources (:mod:`consumers.ids`; ``cloudevents`` is in the default list) read the CloudEvents id
(``ce_id``; ``cloudEvents_id``, ``cloudEvents:id`` or ``ce-id`` on AMQP) in its lossless stored form.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError
from ..ids import uuid_text
from ..incoming import IncomingMessage
from ..message import OutboxRecord
from .base import CONTENT_TYPE_HEADER, Envelope
from .codecs import NATIVE, check_binding

__all__ = ["CLOUDEVENTS", "DEFAULT_SOURCE", "SPECVERSION", "CloudEventsCodec", "check_source", "rfc3339"]

SPECVERSION = "1.0"
_UTC = dt.timezone.utc
#: The ``source`` of events whose row names none (``--ce-source`` changes it).
DEFAULT_SOURCE = "/outboxkit"
_SOURCE_LENGTH = 1024

# The W3C trace context headers (what OpenTelemetry's propagator reads and writes).
_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"
# Row attributes carried as CloudEvents extension attributes (and AMQP properties of the row's names).
_EXTENSIONS = (("correlation_id", "correlationid"), ("app_id", "appid"))

_KAFKA_PREFIX = "ce_"
_AMQP_PREFIX = "cloudEvents_"
#: Prefixes read on AMQP (lower case): the AMQP binding's two spellings, and the knative RabbitMQ
#: binding's ``ce-`` (what the Python SDK's ``cloudevents.core.bindings.rabbitmq`` writes).
_AMQP_READ_PREFIXES = ("cloudevents_", "cloudevents:", "ce-")
_TIME_NAMES = frozenset(p + "time" for p in _AMQP_READ_PREFIXES)
#: where the event id is read from, in order (lower case)

_RESERVED = {
    "kafka": frozenset({"ce_*", CONTENT_TYPE_HEADER, _TRACEPARENT, _TRACESTATE}),
    "amqp": frozenset({"cloudevents_*", "cloudevents:*", "ce-*", _TRACEPARENT, _TRACESTATE}),
}
_RESERVED_EXACT = {b: frozenset(n for n in names if not n.endswith("*")) for b, names in _RESERVED.items()}
_RESERVED_PREFIXES = {b: tuple(n[:-1] for n in names if n.endswith("*")) for b, names in _RESERVED.items()}


def rfc3339(stamp: dt.datetime) -> str:
    """``stamp`` as an RFC 3339 time in UTC: ``2026-12-01T13:20:29.123456Z`` (a naive value is taken as UTC)."""
    tz = stamp.tzinfo
    if tz is _UTC:  # what the relay's rows hold: the cheap path
        return stamp.isoformat()[:-6] + "Z"
    if tz is not None and stamp.utcoffset():
        stamp = stamp.astimezone(_UTC)
    return stamp.replace(tzinfo=None).isoformat() + "Z"


def check_source(source: object, what: str = "the CloudEvents source") -> str:
    """``source`` if it can be a CloudEvents ``source`` (a non-empty URI-reference), else a clear error."""
    if not isinstance(source, str) or not source.strip():
        raise ConfigurationError(f"{what} must be a non-empty URI-reference such as /orders-service "
                                 f"(CloudEvents source), got {source!r}")
    if len(source) > _SOURCE_LENGTH or any(ord(c) < 33 or 127 <= ord(c) < 160 for c in source):
        raise ConfigurationError(f"{what} must be a URI-reference of at most {_SOURCE_LENGTH} characters without "
                                 "spaces or control characters (CloudEvents source)")
    return source


class CloudEventsCodec:
    """CloudEvents 1.0, binary content mode, on Kafka and AMQP (see the module docs for the layout).

    :param source: the ``source`` of rows whose attributes name none.
    """

    name = "cloudevents"

    def __init__(self, *, source: str = DEFAULT_SOURCE) -> None:
        self.source = check_source(source)
        self._last_time: tuple[dt.datetime | None, str] = (None, "")
        """The last ``created_at`` formatted, and its text: the rows of one ``add_many`` share it."""

    def _time(self, stamp: dt.datetime) -> str:
        last, text = self._last_time  # one tuple: safe to read while another thread replaces it
        if last is not None and stamp == last:
            return text
        text = rfc3339(stamp)
        self._last_time = (stamp, text)
        return text

    def configure(self, *, source: str | None = None, **_ignored: Any) -> CloudEventsCodec:
        """A codec like this one with another default ``source`` (options it does not know are ignored)."""
        return self if source is None or source == self.source else CloudEventsCodec(source=source)

    def __repr__(self) -> str:
        return f"CloudEventsCodec(source={self.source!r})"

    # ------------------------------------------------------------------ names

    def reserved(self, binding: str) -> frozenset[str]:
        """Lower-case header names this codec writes or reads; a name ending in ``*`` is a prefix."""
        check_binding(binding)
        return _RESERVED[binding]

    # ------------------------------------------------------------------ encode

    def encode(self, record: OutboxRecord, binding: str) -> Envelope:
        mid = uuid_text(record.message_id)
        attrs: Mapping[str, str] = getattr(record, "attributes", None) or {}
        headers: dict[str, str | bytes] = _user_headers(record.headers, binding) if record.headers else {}
        ce_type = attrs.get("type") or record.topic
        source = attrs.get("source") or self.source
        created = record.created_at
        trace = attrs.get(_TRACEPARENT)
        if binding == "kafka":
            self._attributes(headers, "ce_", mid, source, ce_type, created, attrs, trace, None)
            if record.content_type:
                headers[CONTENT_TYPE_HEADER] = record.content_type
            return Envelope(record.topic, record.key, record.payload, headers, created)
        if binding == "amqp":
            props: dict[str, Any] = {"delivery_mode": 2, "message_id": mid, "content_type": record.content_type,
                                     "type": ce_type}
            self._attributes(headers, "cloudEvents_", mid, source, ce_type, created, attrs, trace, props)
            return Envelope(record.topic, record.key, record.payload, headers, created, props)
        check_binding(binding)
        raise AssertionError  # unreachable

    def _attributes(self, headers: dict[str, str | bytes], prefix: str, mid: str, source: str, ce_type: str,
                    created: Any, attrs: Mapping[str, str], trace: str | None, props: dict[str, Any] | None) -> None:
        """The CloudEvents attributes as ``prefix``-named headers (``ce_`` on Kafka, ``cloudEvents_`` on AMQP);
        on AMQP (``props`` given) the extensions also go to their AMQP properties."""
        headers[prefix + "specversion"] = SPECVERSION
        headers[prefix + "id"] = mid
        headers[prefix + "source"] = source
        headers[prefix + "type"] = ce_type
        if created is not None:
            headers[prefix + "time"] = self._time(created)
        if not attrs:
            return
        subject = attrs.get("subject")
        if subject:
            headers[prefix + "subject"] = subject
        if trace:  # the distributed-tracing extension, and the plain W3C headers beside it
            headers[_TRACEPARENT] = headers[prefix + "traceparent"] = trace
            state = attrs.get(_TRACESTATE)
            if state:
                headers[_TRACESTATE] = headers[prefix + "tracestate"] = state
        for attr, ext in _EXTENSIONS:
            value = attrs.get(attr)
            if value:
                headers[prefix + ext] = value
                if props is not None:
                    props[attr] = value

    # ------------------------------------------------------------------ decode

    def decode(self, envelope: Envelope, binding: str) -> IncomingMessage:
        msg = NATIVE.decode(envelope, binding)  # headers as received, content type, AMQP properties
        attributes = msg.attributes
        found: dict[str, str] = {}
        if binding == "kafka":
            for name, text in msg.headers.items():
                if name[:3].lower() == _KAFKA_PREFIX:
                    found[name[3:].lower()] = text
        else:
            knative: dict[str, str] = {}
            for name, text in msg.headers.items():
                low = name.lower()
                if low.startswith(("cloudevents_", "cloudevents:")):
                    found[low[12:]] = text
                elif low.startswith("ce-"):
                    knative[low[3:]] = text
            for attr, text in knative.items():  # the AMQP binding's own spellings win
                found.setdefault(attr, text)
            if "time" in found:
                found["time"] = _amqp_time(envelope.headers, found["time"])
        if not found:
            return msg
        attributes.update(found)
        if msg.content_type is not None:
            attributes.setdefault("datacontenttype", msg.content_type)
        for attr, ext in _EXTENSIONS:
            if ext in found:
                attributes.setdefault(attr, found[ext])
        return msg


def _amqp_time(headers: Mapping[Any, Any], text: str) -> str:
    """The ``time`` attribute as RFC 3339 text: AMQP senders may write it as a timestamp (a datetime,
    or milliseconds since the epoch as the SDK's AMQP binding does)."""
    for name, value in headers.items():
        if not isinstance(name, str) or name.lower() not in _TIME_NAMES:
            continue
        if isinstance(value, dt.datetime):
            return rfc3339(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return rfc3339(dt.datetime.fromtimestamp(value / 1000, dt.timezone.utc))
    return text


def _user_headers(headers: Mapping[str, str], binding: str) -> dict[str, str | bytes]:
    """The record's headers without the names this codec owns (rows written before the writer refused them)."""
    exact = _RESERVED_EXACT[binding] if binding in _RESERVED_EXACT else frozenset()
    prefixes = _RESERVED_PREFIXES.get(binding, ())
    out: dict[str, str | bytes] = {}
    for k, v in headers.items():
        low = k.lower()
        if low in exact or low.startswith(prefixes):
            continue
        out[k] = v
    return out


#: The registered ``cloudevents`` codec (default source ``/outboxkit``).
CLOUDEVENTS = CloudEventsCodec()
