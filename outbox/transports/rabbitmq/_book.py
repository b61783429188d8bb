"""The RabbitMQ runners' bookkeeping, without I/O: one copy for the pika and the aio-pika runner.

Deliveries in hand (received, waiting for a batch), held retries (unacked, due later), tries so far
per message id, and what to ack or reject given a batch's outcomes (the decoding is
:mod:`outbox.transports.received`'s). The runners only do the channel calls these decisions name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers._runner import check_str
from consumers.base import Outcome, Status
from outbox.errors import ConfigurationError
from outbox.incoming import IncomingMessage
from outbox.transports.base import Codec
from outbox.transports.codecs import get_codec
from outbox.transports.received import message_from_amqp

_MAX_TRACKED_FAILURES = 10_000


def check_settings(batch_size: int, prefetch: int | None, reconnect_max_wait: float | None) -> int:
    """The prefetch (default ``2 * batch_size``), after checking it and ``reconnect_max_wait``."""
    prefetch = 2 * batch_size if prefetch is None else prefetch
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or not batch_size <= prefetch <= 65535:
        raise ConfigurationError(f"prefetch must be an int between batch_size ({batch_size}) and 65535, "
                                 f"got {prefetch!r}")
    if reconnect_max_wait is not None and (not isinstance(reconnect_max_wait, (int, float))
                                           or reconnect_max_wait <= 0):
        raise ConfigurationError(f"reconnect_max_wait must be positive seconds or None, got {reconnect_max_wait!r}")
    return prefetch


class RabbitMQSetup:
    """The settings both RabbitMQ runners take (a mixin of theirs); ``self.consumer`` and ``self.batch_size``
    are set before."""

    consumer: Any
    batch_size: int

    def setup_rabbitmq(self, *, url: str, queue: str, codec: Codec | str | None, prefetch: int | None,
                       reconnect_max_wait: float | None, raw_message_id: Callable[[IncomingMessage], Any]) -> None:
        self.url = check_str("url", url)
        self.deliveries = Deliveries(self.consumer, codec, queue, raw_message_id)
        self.codec, self.queue = self.deliveries.codec, self.deliveries.queue
        self.prefetch = check_settings(self.batch_size, prefetch, reconnect_max_wait)
        self.reconnect_max_wait = reconnect_max_wait
        self.connections = 0


@dataclass
class Settlement:
    """What to tell the broker about a committed batch."""

    ack_upto: int | None = None
    """ack every delivery up to this tag at once (``multiple``), instead of ``acks``"""
    acks: list[IncomingMessage] = field(default_factory=list)
    rejects: list[IncomingMessage] = field(default_factory=list)
    """DEAD (its dead-letter row committed): reject without requeue, to the queue's dead-letter exchange"""


class Deliveries:
    """Deliveries in hand and held retries of one runner."""

    def __init__(self, consumer: Any, codec: Codec | str | None, queue: str,
                 raw_message_id: Callable[[IncomingMessage], Any]) -> None:
        self.consumer = consumer
        self.codec = get_codec(codec)
        self.queue = check_str("queue", queue)
        self._raw_message_id = raw_message_id
        self.buffer: list[IncomingMessage] = []
        self.held: list[tuple[float, IncomingMessage]] = []
        self._failures: dict[str, tuple[int, Any]] = {}

    def received(self, delivery: Any) -> None:
        """Decode a delivery (pika's triple or aio-pika's message, :func:`~outbox.transports.received.
        message_from_amqp`), with its tries so far, and put it in hand."""
        msg = message_from_amqp(delivery, codec=self.codec, queue=self.queue)
        msg_id = self.consumer.find_id(msg)  # the consumer's id sources; process_batch resolves it again
        failed = self._failures.get(msg_id) if msg_id else None
        if failed is not None:
            msg.attempt, msg.first_failed_at = failed
        self.buffer.append(msg)

    def take(self, batch_size: int) -> list[IncomingMessage]:
        """The next batch: held retries that are due first, then deliveries in hand."""
        now = time.monotonic()
        due = [m for t, m in self.held if t <= now][:batch_size]
        self.held = [(t, m) for t, m in self.held if not any(m is d for d in due)]
        room = batch_size - len(due)
        batch, self.buffer = due + self.buffer[:room], self.buffer[room:]
        return batch

    def hold(self, batch: Sequence[IncomingMessage]) -> None:
        """Not committed (stopped): left unacked, for redelivery."""
        self.held.extend((0.0, m) for m in batch)

    def clear(self) -> None:
        """The channel is gone: what it delivered is redelivered by RabbitMQ (never acked here)."""
        self.buffer.clear()
        self.held.clear()

    def settle(self, outcomes: Sequence[Outcome]) -> Settlement:
        """Acks for PROCESSED/DUPLICATE, rejects for DEAD, RETRY held until due (its try counted)."""
        plan = Settlement()
        acks = [o.message for o in outcomes if o.status in (Status.PROCESSED, Status.DUPLICATE)]
        if acks and not self.held and len(acks) == len(outcomes):
            plan.ack_upto = max(int(m.delivery_tag or 0) for m in acks)
        plan.acks = acks
        for o in outcomes:
            m = o.message
            if o.status is Status.DEAD:
                plan.rejects.append(m)
            elif o.status is Status.RETRY:
                m.attempt += 1
                self.held.append((time.monotonic() + (o.retry_in or 0.0), m))
                if m.id is not None and len(self._failures) < _MAX_TRACKED_FAILURES:
                    self._failures[m.id] = (m.attempt, m.first_failed_at)
                continue
            if m.id is not None:
                self._failures.pop(m.id, None)
            raw_id = self._raw_message_id(m)
            if raw_id:
                self._failures.pop(raw_id, None)
        return plan
