"""The neutral shapes every transport shares.

:class:`Publisher` (what the relay drives) and the outcome it reports per message; :class:`Envelope`
(a broker message, neutral); :class:`Codec` (the one owner of the wire format: record -> envelope,
envelope -> :class:`~outbox.incoming.IncomingMessage`); :class:`Transport` (one broker's package:
its publisher, its consumer runner, its options).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..message import OutboxRecord

if TYPE_CHECKING:
    from ..incoming import IncomingMessage

__all__ = ["BINDINGS", "CONTENT_TYPE_HEADER", "MESSAGE_ID_HEADER", "TRACEPARENT", "TRACESTATE", "Codec", "Envelope",
           "Outcome", "PublishResult", "Publisher", "Transport"]

#: Header carrying the outbox message id on Kafka (RabbitMQ also sets the AMQP ``message_id``).
MESSAGE_ID_HEADER = "message-id"
#: Header carrying the payload's content type where the broker has no property for it (Kafka).
CONTENT_TYPE_HEADER = "content-type"
#: W3C Trace Context header names (the writer stores the trace context in ``OutboxRecord.attributes``
#: under the same names; codecs decode it into ``IncomingMessage.attributes`` under them too).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The wire bindings a codec knows: Kafka records and AMQP 0-9-1 messages.
BINDINGS = ("kafka", "amqp")


@dataclass(slots=True)
class Envelope:
    """One broker message, broker-neutral: what a :class:`Codec` produces and reads.

    The codec alone decides what goes where; the transport only turns an envelope into client calls
    (and a client message back into an envelope).
    """

    topic: str
    """Kafka topic, or AMQP exchange (the queue name for the default exchange)."""
    key: str | bytes | None
    """Kafka key, or AMQP routing key."""
    payload: bytes
    headers: dict[str, str | bytes] = field(default_factory=dict)
    """Kafka record headers, or the AMQP headers table (application headers)."""
    timestamp: dt.datetime | None = None
    """Kafka CreateTime, or the AMQP ``timestamp`` property: the row's ``created_at`` on publish."""
    properties: dict[str, Any] = field(default_factory=dict)
    """AMQP basic properties (``message_id``, ``content_type``, ``delivery_mode``, ``correlation_id``,
    ``type``, ``app_id``...). The Kafka binding leaves it empty: everything goes to headers."""
    partition: int | None = None
    """On decode: the Kafka partition it was read from (``None`` on AMQP)."""
    offset: int | None = None
    """On decode: the Kafka offset."""
    delivery_tag: int | None = None
    """On decode: the AMQP delivery tag."""
    redelivered: bool = False
    """On decode: the AMQP ``redelivered`` flag."""
    raw: Any = None
    """On decode: the client's own message object."""


@runtime_checkable
class Codec(Protocol):
    """The one owner of a wire format, in both directions.

    ``binding`` is ``"kafka"`` or ``"amqp"``. ``decode`` leaves the message id ``None``: id sources
    are resolved separately (by the consumer), so that one codec can read ids from any producer.
    """

    name: str

    def reserved(self, binding: str) -> frozenset[str]:
        """Lower-case header names this codec writes itself (a user header must not use them)."""
        ...

    def encode(self, record: OutboxRecord, binding: str) -> Envelope:
        """The broker message for ``record``."""
        ...

    def decode(self, envelope: Envelope, binding: str) -> IncomingMessage:
        """The :class:`~outbox.incoming.IncomingMessage` for a received ``envelope`` (``id`` left ``None``)."""
        ...


@runtime_checkable
class Transport(Protocol):
    """One broker's package: its publisher, its consumer runner, its options.

    Registered by name in :mod:`outbox.transports` (entry point group ``outboxkit.transports``).
    Creating a transport object imports no client library; ``publisher`` and ``runner`` do.
    """

    name: str
    """The ``--broker`` name, e.g. ``"kafka"``."""
    binding: str
    """The codec binding: ``"kafka"`` or ``"amqp"``."""
    options: type
    """A dataclass of its options: declared fields with defaults and help (``metadata["help"]``)."""

    def publisher(self, target: str, settings: Mapping[str, str], *, codec: Codec, **relay_opts: Any) -> Publisher:
        """A publisher for ``target`` (servers or URL) with ``-X key=value`` ``settings``."""
        ...

    def runner(self, consumer: Any, *, engine: Any, target: str, settings: Mapping[str, str], codec: Codec,
               **opts: Any) -> Any:
        """A consumer runner (``run()``, ``stop()``) feeding ``consumer`` from ``target``.

        A transport that can also run an async consumer (on an ``AsyncEngine``) has ``async_runner``, with
        the same arguments, returning a runner whose ``run()`` is a coroutine."""
        ...


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    """The broker confirmed the message (Kafka ack with acks=all, RabbitMQ publisher confirm)."""
    RETRY = "retry"
    """Not delivered, for a reason that may pass (broker down, timeout): try again later."""
    FAILED = "failed"
    """Not delivered, and retrying the same message will not help (too large, unknown topic,
    not authorised, unroutable). The relay marks the row dead with the broker's reason."""


@dataclass(frozen=True)
class PublishResult:
    id: int
    """The outbox row id of the message."""
    outcome: Outcome
    error: str | None = None
    """The broker's reason, for RETRY and FAILED."""
    held: bool = False
    """Not sent at all, because an earlier record with the same key failed in this batch (outcome
    RETRY). The relay leaves such rows untouched: no attempt is counted against them."""


_new = object.__new__


def delivered(record_id: int) -> PublishResult:
    """``PublishResult(record_id, Outcome.DELIVERED)`` for an adapter's per-message delivery report.

    The frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (0.58 µs);
    this fills the two that differ from the defaults straight into the instance's ``__dict__``
    (0.20 µs). The result is an ordinary, equal, frozen :class:`PublishResult`.
    """
    result = _new(PublishResult)
    fields = result.__dict__
    fields["id"] = record_id
    fields["outcome"] = Outcome.DELIVERED
    return result


@runtime_checkable
class Publisher(Protocol):
    """A broker adapter. Not thread-safe: one relay thread drives it.

    ``publish`` sends a batch and returns exactly one result per record, in the order given; it
    never raises for a message-level problem (that is an outcome) and raises
    :class:`~outbox.errors.BrokerUnavailable` only when the broker cannot be reached at all.
    Records with the same key are sent in the order given. Once a record fails before later
    records are sent (for example Kafka's client-side size check), the later records with the
    same key are not sent: they come back as RETRY with ``held=True``, so per-key order survives a
    failure in the middle of a batch.
    """

    def start(self) -> None:
        """Connect and check what can be checked up front (idempotent)."""

    def publish(self, records: Sequence[OutboxRecord], *, timeout: float = 30.0) -> list[PublishResult]:
        """Send ``records`` and wait (at most ``timeout`` s) for the broker's verdict on each."""
        ...

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for everything sent to be confirmed."""

    def idle(self, timeout: float) -> None:
        """Serve the connection for up to ``timeout`` s while there is nothing to publish: heartbeats,
        delivery reports, noticing (and reopening) a lost connection. Never raises.

        Optional: the relay calls it between batches (every second at least) when the adapter has it.
        """

    # Optional too: ``healthy() -> str | None``, None while the broker link works, else why not.
    # The metrics decorator calls it every few seconds while idle, for ``/readyz``.

    def close(self, timeout: float = 10.0) -> None:
        """Flush (bounded by ``timeout``) and release connections. Safe to call twice."""
