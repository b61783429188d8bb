"""What a dedup consumer receives: one broker message, its id and its delivery facts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from outbox.serializers import JSONSerializer, Serializer

__all__ = ["IncomingMessage", "content_hash"]

_DEFAULT_SERIALIZER = JSONSerializer()
_UNSET: Any = object()


@dataclass(eq=False)
class IncomingMessage:
    """One delivery of a message, broker-neutral.

    ``id`` is the message id used for deduplication (the outbox relay's id, a custom extractor's,
    or a content hash; ``None`` until the consumer identified it). ``body`` decodes ``payload``
    lazily by content type; a payload that cannot be decoded raises
    :class:`~outbox.errors.DecodeError` (which is dead-lettered without retries).
    """

    id: str | None
    topic: str
    """Kafka topic, or RabbitMQ exchange (the queue name when the exchange is the default one)."""
    key: str | None
    """Kafka key, or RabbitMQ routing key."""
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    partition: int | None = None
    offset: int | None = None
    delivery_tag: int | None = None
    redelivered: bool = False
    attempt: int = 1
    """1 for the first try in this process; counts retries of this delivery."""
    raw: Any = field(default=None, repr=False)
    """The broker client's own message object (confluent-kafka ``Message``, pika triple), if any."""
    broker: str | None = None
    """``'kafka'``, ``'rabbitmq'``, ``'requeue'`` (from the dead letters) or ``None``."""
    dead_letter_id: int | None = None
    """Set when the message comes back from the dead-letter table through a requeue."""
    first_failed_at: Any = None
    serializer: Serializer | None = field(default=None, repr=False)
    stage_results: dict[str, Any] = field(default_factory=dict, repr=False)
    """For :class:`~consumers.StagedConsumer`: results of the stages already finished."""
    _body: Any = field(default=_UNSET, repr=False)

    @property
    def body(self) -> Any:
        """The decoded payload (JSON -> Python objects, text -> str, anything else -> bytes)."""
        if self._body is _UNSET:
            serializer = self.serializer or _DEFAULT_SERIALIZER
            self._body = serializer.deserialize(self.payload, self.content_type)
        return self._body

    @property
    def lane(self) -> tuple[str, int] | None:
        """The ordering unit: a failing message holds up later messages of its lane only (Kafka partition)."""
        if self.partition is None or self.broker != "kafka":
            return None
        return (self.topic, self.partition)

    @property
    def source(self) -> dict[str, Any]:
        """Delivery facts, as stored with a dead letter."""
        facts: dict[str, Any] = {"broker": self.broker, "topic": self.topic}
        for name in ("partition", "offset", "delivery_tag"):
            value = getattr(self, name)
            if value is not None:
                facts[name] = value
        if self.redelivered:
            facts["redelivered"] = True
        return facts


def content_hash(topic: str, key: str | None, payload: bytes) -> str:
    """SHA-256 (hex) over topic, key and payload, each length-prefixed so that no two inputs collide."""
    h = hashlib.sha256()
    for part in (topic.encode("utf-8"), None if key is None else key.encode("utf-8"), bytes(payload)):
        if part is None:
            h.update(b"\x00")
            continue
        h.update(b"\x01")
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()
