"""What a dedup consumer receives: one broker message, its id and its delivery facts (broker-neutral)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from outbox.schema import MESSAGE_ID_LENGTH
from outbox.serializers import JSONSerializer, Serializer

__all__ = ["ESCAPED_PREFIX", "HASHED_PREFIX", "IncomingMessage", "bounded_text", "content_hash", "header_text",
           "id_text", "storable_id", "text_form"]

#: A text form that starts with this holds bytes that are not plain text (see :func:`text_form`).
ESCAPED_PREFIX = "~x:"
#: A text form that starts with this is an over-long value cut to a prefix plus its SHA-256.
HASHED_PREFIX = "~h:"
_RESERVED = (ESCAPED_PREFIX, HASHED_PREFIX)
_ESCAPE = re.compile("[%\x00\udc80-\udcff]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    if c == "%":
        return "%25"
    if c == "\x00":
        return "%00"
    return f"%{ord(c) - 0xDC00:02X}"  # a byte that is not part of valid UTF-8 (surrogateescape)


def text_form(value: bytes | bytearray | memoryview | str) -> str:
    """A lossless, stable text form of an id, key or header value (bytes or str).

    Valid UTF-8 (a str without lone surrogates) without NUL stays as it is, unless it starts with
    ``~x:`` or ``~h:``. Anything else becomes ``~x:`` followed by the value with each byte that
    is not valid UTF-8, each NUL and each ``%`` written ``%XX`` (a str is taken as its UTF-8
    bytes, lone surrogates as ``surrogatepass`` bytes). Distinct values give distinct texts:
    ``b"\\xff-x"`` -> ``"~x:%FF-x"``, ``b"\\xfe-x"`` -> ``"~x:%FE-x"``, ``"a\\x00b"`` -> ``"~x:a%00b"``.
    """
    if isinstance(value, str):
        if value.isascii():  # the usual header name, topic or id: no surrogates possible
            if "\x00" not in value and not value.startswith(_RESERVED):
                return value
            return ESCAPED_PREFIX + _ESCAPE.sub(_escape_char, value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raw = value.encode("utf-8", "surrogatepass")
        else:
            if "\x00" not in value and not value.startswith(_RESERVED):
                return value
            raw = value.encode("utf-8")
    else:
        raw = bytes(value)
    try:
        text = raw.decode("utf-8")  # strict: valid UTF-8 decodes without lone surrogates
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "surrogateescape")
    else:
        if "\x00" not in text and not text.startswith(_RESERVED):
            return text
    return ESCAPED_PREFIX + _ESCAPE.sub(_escape_char, text)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def header_text(value: object) -> str:
    """A header name or value of any broker type as lossless text: bytes and str by :func:`text_form`,
    AMQP tables and arrays by their repr, numbers and other values by their ``str``."""
    # the usual cases first, as text_form would return them (every received header name and value,
    # topic and key goes through here: a few per message)
    kind = type(value)
    if kind is bytes:
        try:
            text = value.decode("utf-8")  # type: ignore[attr-defined]
        except UnicodeDecodeError:
            return text_form(value)  # type: ignore[arg-type]
        if "\x00" not in text and not text.startswith(_RESERVED):
            return text  # type: ignore[no-any-return]
        return text_form(value)  # type: ignore[arg-type]
    if kind is str and value.isascii() and "\x00" not in value and not value.startswith(_RESERVED):  # type: ignore[attr-defined]
        return value  # type: ignore[return-value]
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return text_form(value)
    if isinstance(value, (dict, list, tuple)):
        return text_form(repr(value))
    return text_form(str(value))


def bounded_text(value: bytes | bytearray | memoryview | str, limit: int) -> str:
    """:func:`text_form` of ``value``, at most ``limit`` characters.

    A longer form becomes ``~h:`` + its first characters + ``~`` + the SHA-256 (hex) of the whole
    form: the same value always gives the same text, and two different values stay different.
    """
    text = text_form(value)
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    keep = max(0, limit - len(HASHED_PREFIX) - 1 - len(digest))
    return f"{HASHED_PREFIX}{text[:keep]}~{digest}"[:limit] if keep else digest[:limit]


def storable_id(text: str) -> bool:
    """True for a str that is already a stored id form (no NUL, no lone surrogate, at most 255 characters)."""
    return (len(text) <= MESSAGE_ID_LENGTH and "\x00" not in text
            and (text.isascii() or not _has_surrogates(text)))


def id_text(value: bytes | bytearray | memoryview | str) -> str:
    """The stored form of a message id: :func:`bounded_text` to the id column's 255 characters."""
    return bounded_text(value, MESSAGE_ID_LENGTH)

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
    attributes: dict[str, str] = field(default_factory=dict)
    """Codec-level attributes: CloudEvents ``type`` / ``source`` / ``time``, AMQP ``correlation_id``,
    ``type``, ``app_id``... (whatever the codec that decoded the message knows)."""
    consumer_group: str | None = None
    """The broker-side consumer group it was read by (the Kafka ``group.id``), for tracing."""
    ordered_by_partition: bool = False
    """Set by a transport with partitions (Kafka): ``(topic, partition)`` is then the ordering lane."""
    stage_results: dict[str, Any] = field(default_factory=dict, repr=False)
    """For :class:`~consumers.StagedConsumer`: results of the stages already finished."""
    _body: Any = field(default=_UNSET, repr=False)
    _identified: Any = field(default=None, init=False, repr=False)
    """``(consumer, id or MessageIdMissing)``: what that consumer's ``identify`` found, so a runner's
    bookkeeping and ``process_batch`` run a ``message_id`` callable once per message."""

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
        if self.partition is None or not self.ordered_by_partition:
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
