"""Every exception the toolkit raises, in one flat module.

The tree::

    OutboxError
    ├── ConfigurationError            bad settings, caught at construction
    │   └── InvalidIdentifier         a table / schema / consumer name that is not a safe identifier
    ├── MessageError (ValueError)     a message rejected by the writer before it reaches the table
    │   ├── SerializationError        the payload cannot be turned into bytes
    │   ├── PayloadTooLarge           payload + key + headers over max_payload_bytes
    │   ├── InvalidTopic              not a legal Kafka topic / RabbitMQ exchange name, or too long
    │   ├── InvalidKey                a key that is not a short string, or holds NUL / lone surrogates
    │   ├── InvalidHeaders            headers (and content_type) of the wrong type, too long, NUL, surrogates
    │   │   └── ReservedHeader        a header name a codec writes itself (message-id, ce_*, ...), or given twice
    │   ├── InvalidAttribute          type / source / subject / correlation_id / app_id not a short, clean str
    │   ├── InvalidMessageId          not a UUID, or an id already added / committed
    │   └── InvalidDeliveryTime       naive datetimes, times in the past, negative or non-finite delays
    ├── DatabaseError                 database problems the toolkit can name
    │   ├── UnsupportedDatabase       a dialect or server version the toolkit cannot run on
    │   └── SchemaMissing             the toolkit's tables are not there (run `outbox db upgrade`)
    ├── BrokerError                   broker problems, translated at the adapter boundary
    │   ├── BrokerUnavailable         cannot connect / connection lost (retriable)
    │   └── PublishFailed             a publish outcome that the caller asked to raise
    ├── RelayError
    │   ├── LeaseLost                 a partition lease was taken over (fencing generation moved)
    │   ├── SingleRelayOnly           SQLite: another relay took over while this one was silent
    │   ├── DuplicateRelay            another live process runs under this relay id
    │   └── RelayGroupConflict        a live relay would split this relay's topics (other broker/topics)
    └── ConsumerError
        ├── MessageIdMissing          no usable message id: sent to the dead letters, never processed
        ├── DecodeError               the payload cannot be decoded (not retried)
        ├── StaleVersion              optimistic version check matched no row
        └── IllegalTransition         a state change the state machine does not allow
"""

from __future__ import annotations

__all__ = [
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
    "LeaseLost",
    "MessageError",
    "MessageIdMissing",
    "OutboxError",
    "PayloadTooLarge",
    "PublishFailed",
    "RelayError",
    "RelayGroupConflict",
    "ReservedHeader",
    "SchemaMissing",
    "SerializationError",
    "SingleRelayOnly",
    "StaleVersion",
    "UnsupportedDatabase",
]


class OutboxError(Exception):
    """Base class of every error raised by outboxkit."""


class ConfigurationError(OutboxError, ValueError):
    """A setting is missing, of the wrong type or out of range."""


class InvalidIdentifier(ConfigurationError):
    """A table, schema or consumer name that is not a plain SQL identifier."""


class MessageError(OutboxError, ValueError):
    """A message was rejected before anything reached the session."""


class SerializationError(MessageError, TypeError):
    """The payload could not be serialised."""


class PayloadTooLarge(MessageError):
    """The message (payload + key + header bytes) is larger than ``Outbox(max_payload_bytes=...)``."""

    def __init__(self, size: int, limit: int, *, payload: int | None = None, key: int = 0, headers: int = 0) -> None:
        self.size = size
        self.limit = limit
        parts = f" (payload {payload:,} + key {key:,} + headers {headers:,})" if payload is not None and (
            key or headers) else ""
        what = "message" if parts else "payload"
        super().__init__(
            f"{what} is {size:,} bytes{parts}, over the limit of {limit:,} bytes. Store the data elsewhere and "
            "send a reference, or raise the limit with Outbox(max_payload_bytes=N) together with the brokers' "
            "limits (Kafka: message.max.bytes on the broker and the relay's producer; RabbitMQ: max_message_size), "
            "see the README's 'Message size'"
        )


class InvalidTopic(MessageError):
    """The topic / exchange name is not legal."""


class InvalidKey(MessageError):
    """The key / routing key is not legal."""


class InvalidHeaders(MessageError):
    """Header names or values (or ``content_type``) that no broker or database would take."""


class ReservedHeader(InvalidHeaders):
    """A header name that a codec writes itself (compared case-insensitively), or two names equal but for case."""


class InvalidAttribute(MessageError):
    """A message attribute (``type``, ``source``, ``subject``, ``correlation_id``, ``app_id``) that is not a
    non-empty str within its length, or holds NUL / lone surrogates."""


class InvalidMessageId(MessageError):
    """The message id is not a UUID, or another message of this transaction (or a committed one) has it."""


class InvalidDeliveryTime(MessageError):
    """deliver_at / delay are inconsistent, naive or in the past."""


class DatabaseError(OutboxError):
    """A database problem the toolkit can explain."""


class UnsupportedDatabase(DatabaseError):
    """The database or its version is not supported for this operation."""


class SchemaMissing(DatabaseError):
    """The toolkit's tables do not exist: run `outbox db upgrade`."""


class BrokerError(OutboxError):
    """A broker problem, translated from the client library's exception."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached or the connection was lost."""


class PublishFailed(BrokerError):
    """A message could not be published."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        self.retriable = retriable
        super().__init__(message)


class RelayError(OutboxError):
    """A relay-level problem."""


class LeaseLost(RelayError):
    """Another relay holds this partition now; this relay must not touch its rows."""


class SingleRelayOnly(RelayError):
    """This database supports a single relay, and another one took over while this one was not renewing
    (a second relay started next to a live one waits as a standby instead)."""


class DuplicateRelay(RelayError):
    """Another live process holds this relay id (its heartbeat keeps advancing): give each relay its own id."""


class RelayGroupConflict(RelayError):
    """A live relay publishes some of this relay's topics elsewhere (another broker, or other topic
    patterns in the same group, or overlapping topics in another group): starting would split a stream."""


class ConsumerError(OutboxError):
    """A dedup consumer problem."""


class MessageIdMissing(ConsumerError):
    """The message carries no usable id, so it cannot be deduplicated."""


class DecodeError(ConsumerError):
    """The payload could not be decoded; retrying will not help."""


class StaleVersion(ConsumerError):
    """An optimistic update matched no row: the version moved or the row is gone."""


class IllegalTransition(ConsumerError):
    """The state machine does not allow this transition."""
