"""Broker adapters: one :class:`Publisher` protocol, implemented for Kafka, RabbitMQ and memory."""

from __future__ import annotations

from .base import MESSAGE_ID_HEADER, Outcome, Publisher, PublishResult
from .kafka import KafkaPublisher
from .memory import MemoryPublisher
from .rabbitmq import RabbitMQPublisher

__all__ = [
    "MESSAGE_ID_HEADER",
    "KafkaPublisher",
    "MemoryPublisher",
    "Outcome",
    "PublishResult",
    "Publisher",
    "RabbitMQPublisher",
]
