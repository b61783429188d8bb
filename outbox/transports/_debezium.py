"""The ``debezium`` codec: messages laid out as Debezium's outbox event router emits them.

Consumers written for Debezium's outbox pattern (``io.debezium.transforms.outbox.EventRouter``
with its defaults) read these messages unchanged:

- Kafka: key = the row's key (Debezium's ``aggregateid``), value = the payload as stored (what
  the router emits with ``table.expand.json.payload=true`` or a string converter; no Debezium
  change-event envelope), timestamp = ``created_at`` (the router's ``table.field.event.timestamp``),
  headers = ``id`` (the outbox message id, the UUID ``add()`` returned, as text: what the router
  writes from its ``id`` column with Kafka Connect's default header converter) plus the row's own
  headers (as ``table.fields.additional.placement=...:header:...`` puts extra columns).
- RabbitMQ: as Debezium Server's RabbitMQ sink publishes a router record: the same headers in the
  AMQP headers table, body = payload, routing key = key, persistent (``delivery_mode`` 2).

Beyond Debezium's defaults (extra headers and properties, which Debezium consumers ignore):
``content-type`` (Kafka header; the ``content_type`` property on RabbitMQ) when the row has
one, the W3C ``traceparent`` / ``tracestate`` headers when the row carries trace context (what
Debezium's OpenTelemetry tracing propagates), and on RabbitMQ the ``message_id`` (= ``id``),
``timestamp``, ``type``, ``correlation_id`` and ``app_id`` properties.

The topic is the row's topic: name it as Debezium's ``route.topic.replacement`` would
(``outbox.event.<aggregatetype>`` by default) if consumers expect that. The row's ``type``
attribute is not put in a header on Kafka (the router emits none by default; Debezium users who
configure ``table.fields.additional.placement=type:header:eventType`` can add an ``eventType``
header to the row). Decoding is the native codec's (headers as received) with the id taken from
the ``id`` header, in its lossless stored form.

Sources: Debezium's ``EventRouterDelegate`` (the ``id`` header, key, timestamp, additional
fields) and the outbox event router documentation; Debezium Server's
``RabbitMqStreamChangeConsumer`` (headers table, delivery mode, routing key).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..ids import uuid_text
from ..incoming import IncomingMessage
from ..message import OutboxRecord
from .base import CONTENT_TYPE_HEADER, Envelope
from .codecs import NATIVE, check_binding

__all__ = ["DEBEZIUM", "EVENT_ID_HEADER", "DebeziumCodec"]

#: The header holding the event id, as Debezium's outbox event router names it.
EVENT_ID_HEADER = "id"
_TRACE = ("traceparent", "tracestate")
_AMQP_ATTRS = ("type", "correlation_id", "app_id")

_RESERVED = {
    "kafka": frozenset({EVENT_ID_HEADER, CONTENT_TYPE_HEADER, *_TRACE}),
    "amqp": frozenset({EVENT_ID_HEADER, *_TRACE}),
}


class DebeziumCodec:
    """Debezium outbox event router layout (see the module docs)."""

    name = "debezium"

    def reserved(self, binding: str) -> frozenset[str]:
        check_binding(binding)
        return _RESERVED[binding]

    def encode(self, record: OutboxRecord, binding: str) -> Envelope:
        mid = uuid_text(record.message_id)
        reserved = self.reserved(binding)
        headers: dict[str, str | bytes] = (
            {k: v for k, v in record.headers.items() if k.lower() not in reserved} if record.headers else {}
        )
        headers[EVENT_ID_HEADER] = mid
        attrs: Mapping[str, str] = getattr(record, "attributes", None) or {}
        if attrs:
            for name in _TRACE:
                value = attrs.get(name)
                if value:
                    headers[name] = value
        if binding == "kafka":
            if record.content_type:
                headers[CONTENT_TYPE_HEADER] = record.content_type
            return Envelope(record.topic, record.key, record.payload, headers, record.created_at)
        props: dict[str, Any] = {"delivery_mode": 2, "message_id": mid, "content_type": record.content_type}
        if attrs:
            for name in _AMQP_ATTRS:
                value = attrs.get(name)
                if value:
                    props[name] = value
        return Envelope(record.topic, record.key, record.payload, headers, record.created_at, props)

    def decode(self, envelope: Envelope, binding: str) -> IncomingMessage:
        # the event id stays in the ``id`` header: the consumer's id sources read it (``header:id``
        # is in the default list), losslessly
        return NATIVE.decode(envelope, binding)

    def __repr__(self) -> str:
        return "DebeziumCodec()"


#: The registered ``debezium`` codec.
DEBEZIUM = DebeziumCodec()
