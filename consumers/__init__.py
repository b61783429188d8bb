"""Dedup consumers: exactly-once database effects on top of at-least-once delivery.

Subclass :class:`DedupConsumer` (or :class:`StagedConsumer`; for asyncio services
:class:`AsyncDedupConsumer` / :class:`AsyncStagedConsumer` with ``async def handle``), then run it with
:class:`KafkaRunner` / :class:`RabbitMQRunner` or ``outbox consume MODULE:CLASS``::

    class ChargeOrder(DedupConsumer):
        name = "billing.charge-order"

        def handle(self, session, message):
            ...
            return {"charge_id": charge.id}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outbox.errors import (
    ConfigurationError,
    ConsumerError,
    DecodeError,
    IllegalTransition,
    MessageIdMissing,
    StaleVersion,
)
from outbox.incoming import IncomingMessage, content_hash

from .base import DedupConsumer, Outcome, Status
from .deadletters import get_dead_letter, list_dead_letters, purge_dead_letters, requeue_dead_letters
from .ids import DEFAULT_ID_FROM, IdSource, parse_id_sources, resolve_id
from .retention import purge_processed
from .staged import StagedConsumer, stage
from .versioning import StateMachine, versioned_update

if TYPE_CHECKING:
    from outbox.transports.kafka.aiorunner import AsyncKafkaRunner
    from outbox.transports.rabbitmq.aiorunner import AsyncRabbitMQRunner
    from outbox.transports.received import message_from_amqp, message_from_kafka

    from .aio import AsyncDedupConsumer, AsyncStagedConsumer
    from .kafka import KafkaRunner
    from .rabbitmq import RabbitMQRunner, declare_queue

__all__ = [
    "DEFAULT_ID_FROM",
    "AsyncDedupConsumer",
    "AsyncKafkaRunner",
    "AsyncRabbitMQRunner",
    "AsyncStagedConsumer",
    "ConfigurationError",
    "ConsumerError",
    "DecodeError",
    "DedupConsumer",
    "IdSource",
    "IllegalTransition",
    "IncomingMessage",
    "KafkaRunner",
    "MessageIdMissing",
    "Outcome",
    "RabbitMQRunner",
    "StagedConsumer",
    "StaleVersion",
    "StateMachine",
    "Status",
    "content_hash",
    "declare_queue",
    "get_dead_letter",
    "list_dead_letters",
    "message_from_amqp",
    "message_from_kafka",
    "parse_id_sources",
    "purge_dead_letters",
    "purge_processed",
    "requeue_dead_letters",
    "resolve_id",
    "stage",
    "versioned_update",
]

_LAZY = {"AsyncDedupConsumer": "consumers.aio", "AsyncStagedConsumer": "consumers.aio",
         "message_from_amqp": "outbox.transports.received", "message_from_kafka": "outbox.transports.received",
         "KafkaRunner": "outbox.transports.kafka.runner", "RabbitMQRunner": "outbox.transports.rabbitmq.runner",
         "declare_queue": "outbox.transports.rabbitmq.runner",
         "AsyncKafkaRunner": "outbox.transports.kafka.aiorunner",
         "AsyncRabbitMQRunner": "outbox.transports.rabbitmq.aiorunner"}


def __getattr__(name: str) -> Any:
    """Broker runners and the asyncio consumers are imported on first use, so the core needs neither client
    library nor SQLAlchemy's asyncio extension loaded."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'consumers' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
