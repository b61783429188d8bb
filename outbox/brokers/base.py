"""The one interface every broker adapter implements, and the outcome it reports per message."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..message import OutboxRecord

__all__ = ["MESSAGE_ID_HEADER", "Outcome", "PublishResult", "Publisher"]

#: Header carrying the outbox message id on Kafka (RabbitMQ also sets the AMQP ``message_id``).
MESSAGE_ID_HEADER = "message-id"


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
