"""outboxkit: the transactional outbox for SQLAlchemy services.

Add messages to the same session as your business rows with :class:`Outbox`; run the relay
(``outbox relay``) to publish them to Kafka or RabbitMQ at least once, in per-key order.
"""

from __future__ import annotations

from .errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    ConsumerError,
    DatabaseError,
    DecodeError,
    DuplicateRelay,
    IllegalTransition,
    InvalidAttribute,
    InvalidDeliveryTime,
    InvalidHeaders,
    InvalidIdentifier,
    InvalidKey,
    InvalidMessageId,
    InvalidTopic,
    LeaseLost,
    MessageError,
    MessageIdMissing,
    OutboxError,
    PayloadTooLarge,
    PublishFailed,
    RelayError,
    RelayGroupConflict,
    ReservedHeader,
    SchemaMissing,
    SerializationError,
    SingleRelayOnly,
    StaleVersion,
    UnsupportedDatabase,
)
from .ids import uuid7
from .message import OutboxRecord, OutgoingMessage, partition_for
from .schema import OutboxTables, TableNames, default_tables
from .serializers import JSONSerializer, Serializer
from .writer import DEFAULT_PARTITIONS, Outbox

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PARTITIONS",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigurationError",
    "ConsumerError",
    "DatabaseError",
    "DecodeError",
    "DuplicateRelay",
    "IllegalTransition",
    "InvalidAttribute",
    "InvalidDeliveryTime",
    "InvalidHeaders",
    "InvalidIdentifier",
    "InvalidKey",
    "InvalidMessageId",
    "InvalidTopic",
    "JSONSerializer",
    "LeaseLost",
    "MessageError",
    "MessageIdMissing",
    "Outbox",
    "OutboxError",
    "OutboxRecord",
    "OutboxTables",
    "OutgoingMessage",
    "PayloadTooLarge",
    "PublishFailed",
    "RelayError",
    "RelayGroupConflict",
    "ReservedHeader",
    "SchemaMissing",
    "SerializationError",
    "Serializer",
    "SingleRelayOnly",
    "StaleVersion",
    "TableNames",
    "UnsupportedDatabase",
    "__version__",
    "default_tables",
    "partition_for",
    "uuid7",
]
