"""Broker adapters (moved to :mod:`outbox.transports`); kept as an import path, loaded lazily.

``from outbox.brokers.memory import MemoryPublisher`` loads neither confluent_kafka nor pika.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..transports.base import MESSAGE_ID_HEADER, Outcome, Publisher, PublishResult

__all__ = [
    "MESSAGE_ID_HEADER",
    "KafkaPublisher",
    "MemoryPublisher",
    "Outcome",
    "PublishResult",
    "Publisher",
    "RabbitMQPublisher",
]

_LAZY = {
    "KafkaPublisher": "outbox.transports.kafka.publisher",
    "MemoryPublisher": "outbox.transports.memory.publisher",
    "RabbitMQPublisher": "outbox.transports.rabbitmq.publisher",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
