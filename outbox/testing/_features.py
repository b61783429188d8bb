"""What a transport promises: the flags the contract suites read to choose and tune their tests."""

from __future__ import annotations

from dataclasses import dataclass

from ..transports.base import Outcome

__all__ = ["Features"]


@dataclass(frozen=True)
class Features:
    """The guarantees and capabilities of one transport, as the contract suites test them.

    A test whose feature is off is reported as skipped with the flag's name, never silently dropped,
    so a transport's run shows exactly which guarantees it does not claim. Like Watermill's
    ``tests.Features``: declare what is true, and the suite holds the transport to it.
    """

    per_key_order: bool = True
    """Messages with the same key reach the broker, and a consumer, in the order published."""
    size_limit: int | None = 1_000_000
    """The largest payload the harness's publisher accepts: a payload of 900,000 bytes is delivered,
    one of 1,200,000 is FAILED with a reason naming the size. ``None``: no limit to test."""
    missing_topic: Outcome | None = Outcome.FAILED
    """The outcome of a message for a topic (exchange, subject...) that does not exist: FAILED where
    a missing target is a mistake, RETRY where a deploy may create it later (Kafka). ``None``: the
    transport has no such notion."""
    missing_topic_reason: str = ""
    """Text the reason of that outcome contains (the broker's own words, e.g. ``UNKNOWN_TOPIC``, ``404``)."""
    broker_timestamps: bool = False
    """The broker message carries the row's ``created_at`` as its timestamp (Kafka CreateTime, AMQP
    ``timestamp``), and the harness reads it back."""
    message_properties: bool = False
    """The broker has message properties besides headers (AMQP ``message_id``, ``content_type``,
    ``delivery_mode``), and the codec fills them."""
    credentials: bool = True
    """Settings can carry a secret, and the harness gives an unreachable publisher holding one: the
    secret must never appear in an error."""
    consumer_runner: bool = True
    """The transport has a consumer runner (``outbox consume``): the consumer-runner suite applies."""
    redelivery_flag: bool = False
    """A message delivered again after a crash is marked ``message.redelivered`` (AMQP ``redelivered``)."""
