"""A received broker message as an :class:`~outbox.incoming.IncomingMessage`, from any client's object.

One place turns a Kafka record or an AMQP delivery into the envelope the codecs read and the
message a dedup consumer processes: our own runners (confluent-kafka, pika) use it, and so does
your framework's handler (aiokafka, aio-pika, FastStream, confluent-kafka's own loop)::

    from consumers import message_from_kafka, message_from_amqp

    @broker.subscriber("orders", group_id="billing")     # FastStream
    async def on_order(body: dict, msg: KafkaMessage) -> None:
        outcome = await consumer.process(engine, message_from_kafka(msg, group_id="billing"))
        ...

The codec (``"native"``, ``"cloudevents"``, ``"debezium"`` or your own, see
:mod:`outbox.transports.codecs`) decodes it exactly as the runners do; the id is left to the
consumer's id sources (:mod:`consumers.ids`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from outbox.errors import ConfigurationError
from outbox.incoming import IncomingMessage, header_text
from outbox.transports.base import Codec, Envelope
from outbox.transports.codecs import get_codec, utc_seconds

__all__ = ["AMQP_PROPERTIES", "amqp_message", "kafka_message", "message_from_amqp", "message_from_kafka"]

#: The AMQP basic properties handed to the codec (pika's names and wire forms).
AMQP_PROPERTIES = ("message_id", "content_type", "content_encoding", "correlation_id", "type", "app_id",
                   "timestamp", "reply_to", "expiration", "priority", "user_id", "delivery_mode")


def kafka_message(
    codec: Codec,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | str | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes | str | None]] | None,
    *,
    group_id: str | None = None,
    raw: Any = None,
) -> IncomingMessage:
    """The message of one Kafka record, decoded by ``codec`` (what every Kafka transport builds)."""
    raw_headers: dict[str, str | bytes] = {k: v for k, v in headers or () if v is not None}
    env = Envelope(topic, key, bytes(value or b""), raw_headers, partition=partition, offset=offset, raw=raw)
    msg = codec.decode(env, "kafka")
    msg.id = None  # the consumer's id sources own the id (consumers.ids), whatever the codec
    msg.broker = "kafka"
    msg.consumer_group = group_id
    msg.ordered_by_partition = True
    return msg


def amqp_message(
    codec: Codec,
    exchange: str,
    routing_key: str | None,
    body: bytes,
    headers: Mapping[str, Any] | None,
    properties: Mapping[str, Any],
    *,
    delivery_tag: int | None,
    redelivered: bool,
    raw: Any = None,
) -> IncomingMessage:
    """The message of one AMQP delivery, decoded by ``codec`` (what every AMQP transport builds).

    ``exchange`` is the exchange, or the queue name for the default exchange; ``properties`` the
    basic properties in pika's forms (``timestamp`` in whole seconds, ``expiration`` as text).
    """
    env = Envelope(exchange, routing_key, bytes(body), dict(headers or {}), properties=dict(properties),
                   delivery_tag=delivery_tag, redelivered=bool(redelivered), raw=raw)
    msg = codec.decode(env, "amqp")
    msg.id = None  # the consumer's id sources own the id (consumers.ids), whatever the codec
    message_id = properties.get("message_id")
    if message_id and "message_id" not in msg.attributes:  # the `message_id` id source reads it here
        msg.attributes["message_id"] = header_text(message_id)  # a shortstr: bytes when not UTF-8
    msg.broker = "rabbitmq"
    return msg


def _faststream_raw(message: Any) -> Any:
    """FastStream hands its own message object; the client's record is its ``raw_message``."""
    raw = getattr(message, "raw_message", None)
    if raw is None:
        return message
    if isinstance(raw, (tuple, list)):
        raise ConfigurationError("a FastStream batch message holds several records: build one message per record "
                                 "(message_from_kafka(record) for record in msg.raw_message)")
    return raw


def message_from_kafka(
    record: Any, *, codec: str | Codec | None = None, group_id: str | None = None
) -> IncomingMessage:
    """An :class:`IncomingMessage` from a Kafka record of any client.

    ``record``: an aiokafka ``ConsumerRecord``, a confluent-kafka ``Message`` or a FastStream
    ``KafkaMessage`` (its ``raw_message``). ``codec`` as for the runners (default ``"native"``);
    ``group_id``: the consumer group it was read by (for tracing). ``.raw`` keeps ``record``.
    """
    rec = _faststream_raw(record)
    the_codec = get_codec(codec)
    if callable(getattr(rec, "topic", None)):  # confluent-kafka Message: accessor methods
        if rec.error() is not None:
            raise ConfigurationError(f"a Kafka error event, not a record: {rec.error()}")
        return kafka_message(the_codec, rec.topic() or "", rec.partition() or 0, rec.offset() or 0, rec.key(),
                             rec.value(), rec.headers(), group_id=group_id, raw=record)
    try:
        topic, partition, offset = rec.topic, rec.partition, rec.offset
        key, value, headers = rec.key, rec.value, rec.headers
    except AttributeError:
        raise ConfigurationError(f"not a Kafka record: {type(record).__name__} (expected an aiokafka ConsumerRecord, "
                                 "a confluent-kafka Message or a FastStream KafkaMessage)") from None
    if not isinstance(value, (bytes, bytearray, memoryview, type(None))):
        raise ConfigurationError(f"the record's value is a {type(value).__name__}, not bytes: read it without a "
                                 "value_deserializer, the codec decodes it")
    return kafka_message(the_codec, topic, partition, offset, key, value, headers, group_id=group_id, raw=record)


def message_from_amqp(
    message: Any, *, codec: str | Codec | None = None, queue: str | None = None
) -> IncomingMessage:
    """An :class:`IncomingMessage` from an AMQP delivery of any client.

    ``message``: an aio-pika ``IncomingMessage`` (or ``AbstractIncomingMessage``), a FastStream
    ``RabbitMessage`` (its ``raw_message``) or pika's ``(method, properties, body)`` triple.
    ``queue``: the name used as ``topic`` when the message came through the default exchange.
    """
    the_codec = get_codec(codec)
    if isinstance(message, tuple) and len(message) == 3:  # pika: (Basic.Deliver, BasicProperties, body)
        method, props, body = message
        properties = {n: getattr(props, n) for n in AMQP_PROPERTIES}
        return amqp_message(the_codec, method.exchange or queue or "", method.routing_key, body, props.headers,
                            properties, delivery_tag=method.delivery_tag, redelivered=method.redelivered,
                            raw=message)
    rec = _faststream_raw(message)
    try:
        body, exchange, routing_key = rec.body, rec.exchange, rec.routing_key
        properties = {n: getattr(rec, n) for n in AMQP_PROPERTIES}
    except AttributeError:
        raise ConfigurationError(f"not an AMQP delivery: {type(message).__name__} (expected an aio-pika "
                                 "IncomingMessage, a FastStream RabbitMessage or pika's (method, properties, "
                                 "body))") from None
    if isinstance(properties["timestamp"], dt.datetime):  # aio-pika decodes it: back to the wire's seconds
        stamp = properties["timestamp"]
        properties["timestamp"] = utc_seconds(stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc))
    if isinstance(properties["expiration"], (int, float)) and not isinstance(properties["expiration"], bool):
        properties["expiration"] = str(int(properties["expiration"] * 1000))  # aio-pika: seconds; wire: ms text
    return amqp_message(the_codec, exchange or queue or "", routing_key, body, rec.headers, properties,
                        delivery_tag=rec.delivery_tag, redelivered=rec.redelivered, raw=message)
