"""The writer: adds outbox rows to the caller's SQLAlchemy session and never commits or flushes.

The rows are ordinary pending ORM objects, so they are inserted when the session flushes and
commit or roll back with the business rows, savepoints included. ``Session`` and ``AsyncSession``
work the same way (``add`` is synchronous on both).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, registry

from . import dialects
from .errors import (
    ConfigurationError,
    InvalidDeliveryTime,
    InvalidHeaders,
    InvalidKey,
    InvalidMessageId,
    InvalidTopic,
    MessageError,
    PayloadTooLarge,
    SerializationError,
)
from .ids import uuid7
from .message import OutgoingMessage, partition_for
from .schema import DUE_NOW, STATUS_PENDING, TOPIC_LENGTH, OutboxTables, default_tables
from .serializers import JSONSerializer, Serializer

__all__ = ["DEFAULT_PARTITIONS", "DEFAULT_TOPIC_PATTERN", "Outbox"]

DEFAULT_PARTITIONS = 32
DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: Legal for both Kafka topics and RabbitMQ exchanges.
DEFAULT_TOPIC_PATTERN = rf"[A-Za-z0-9._\-]{{1,{TOPIC_LENGTH}}}"
_MAX_HEADER_BYTES = 64 * 1024
_NOTIFY_KEY = "outboxkit.notify_channels"


class _OutboxRow:
    """Base of the per-table mapped row classes."""

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


_MAPPED: dict[int, type[_OutboxRow]] = {}
_registry = registry()


def _row_class(tables: OutboxTables) -> type[_OutboxRow]:
    cls = _MAPPED.get(id(tables.outbox))
    if cls is None:
        cls = type(f"OutboxRow_{tables.names.outbox}", (_OutboxRow,), {})
        _registry.map_imperatively(cls, tables.outbox)
        _MAPPED[id(tables.outbox)] = cls
    return cls


class Outbox:
    """Configured once, used in every transaction that must send messages.

    ``Outbox(partitions=...)`` fixes how keys map to partitions; relays rely on it to keep per-key
    order, so never change it on a table that has pending rows.
    """

    def __init__(
        self,
        *,
        serializer: Serializer | None = None,
        tables: OutboxTables | None = None,
        partitions: int = DEFAULT_PARTITIONS,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
        topic_pattern: str = DEFAULT_TOPIC_PATTERN,
        naive_datetimes: str = "reject",
        allow_past_deliver_at: bool = False,
        notify: bool = False,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(partitions, int) or not 1 <= partitions <= 32767:
            raise ConfigurationError(f"partitions must be an int between 1 and 32767, got {partitions!r}")
        if not isinstance(max_payload_bytes, int) or max_payload_bytes <= 0:
            raise ConfigurationError(f"max_payload_bytes must be a positive int, got {max_payload_bytes!r}")
        if naive_datetimes not in ("reject", "utc"):
            raise ConfigurationError(f"naive_datetimes must be 'reject' or 'utc', got {naive_datetimes!r}")
        if serializer is not None and not isinstance(serializer, Serializer):
            raise ConfigurationError(
                f"serializer {serializer!r} has no serialize/deserialize methods (see outbox.Serializer)"
            )
        try:
            self._topic_re = re.compile(topic_pattern)
        except re.error as exc:
            raise ConfigurationError(f"topic_pattern {topic_pattern!r} is not a valid regex: {exc}") from None
        self.serializer: Serializer = serializer or JSONSerializer()
        self.tables = tables or default_tables()
        self.partitions = partitions
        self.max_payload_bytes = max_payload_bytes
        self.topic_pattern = topic_pattern
        self.naive_datetimes = naive_datetimes
        self.allow_past_deliver_at = allow_past_deliver_at
        self.notify = notify
        self.notify_channel = self.tables.names.outbox
        self.default_headers = self._check_headers(default_headers)
        self._row_cls = _row_class(self.tables)

    # ------------------------------------------------------------------ public API
    def add(
        self,
        session: Any,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: uuid.UUID | str | None = None,
        deliver_at: dt.datetime | None = None,
        delay: dt.timedelta | float | None = None,
        content_type: str | None = None,
    ) -> uuid.UUID:
        """Add one message to ``session`` (a ``Session`` or ``AsyncSession``); return its id.

        Nothing is flushed or committed: the row is written with the session's next flush and
        commits or rolls back with everything else in the transaction.
        """
        row = self._build(
            OutgoingMessage(topic, payload, key, headers, message_id, deliver_at, delay, content_type),
            _now(),
        )
        self._attach(session, [row])
        return row.message_id  # type: ignore[attr-defined,no-any-return]

    def add_many(self, session: Any, messages: Iterable[OutgoingMessage | Mapping[str, Any]]) -> list[uuid.UUID]:
        """Validate every message, then add them all (or none, if one is invalid)."""
        now = _now()
        rows = []
        for i, m in enumerate(messages):
            msg = m if isinstance(m, OutgoingMessage) else _from_mapping(m, i)
            try:
                rows.append(self._build(msg, now))
            except MessageError as exc:
                exc.args = (f"message #{i}: {exc.args[0]}",)
                raise
        self._attach(session, rows)
        return [r.message_id for r in rows]  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ internals
    def _attach(self, session: Any, rows: list[_OutboxRow]) -> None:
        sync = _sync_session(session)
        sync.add_all(rows)
        if self.notify:
            self._arm_notify(sync)

    def _arm_notify(self, sync: Session) -> None:
        channels: set[str] | None = sync.info.get(_NOTIFY_KEY)
        if channels is None:
            channels = set()
            sync.info[_NOTIFY_KEY] = channels
            if not event.contains(sync, "before_commit", _send_notifies):
                event.listen(sync, "before_commit", _send_notifies)
                event.listen(sync, "after_rollback", _clear_notifies)
        channels.add(self.notify_channel)

    def _build(self, msg: OutgoingMessage, now: dt.datetime) -> _OutboxRow:
        topic = msg.topic
        if not isinstance(topic, str) or not self._topic_re.fullmatch(topic):
            raise InvalidTopic(
                f"topic {topic!r} is not a valid topic/exchange name: it must match {self.topic_pattern!r} "
                "(letters, digits, '.', '_' and '-', at most 249 characters)"
            )
        key = msg.key
        if key is not None:
            if not isinstance(key, str):
                raise InvalidKey(
                    f"key must be a str or None, got {type(key).__name__} {key!r}; convert it with str()"
                )
            if len(key.encode("utf-8")) > 255 or key == "":
                raise InvalidKey(f"key must be 1-255 UTF-8 bytes, got {len(key.encode('utf-8'))} bytes")
        headers = self._check_headers(msg.headers)
        if self.default_headers:
            headers = {**self.default_headers, **headers}
        mid = _message_id(msg.message_id)
        available_at = self._available_at(msg.deliver_at, msg.delay, now)
        try:
            data, ctype = self.serializer.serialize(msg.payload)
        except MessageError:
            raise
        except Exception as exc:
            raise SerializationError(
                f"cannot serialise payload of type {type(msg.payload).__qualname__!r}: {exc}"
            ) from exc
        if not isinstance(data, (bytes, bytearray)):
            raise SerializationError(
                f"serializer returned {type(data).__name__}, not bytes, for a {type(msg.payload).__qualname__!r}"
            )
        if len(data) > self.max_payload_bytes:
            raise PayloadTooLarge(len(data), self.max_payload_bytes)
        content_type = msg.content_type if msg.content_type is not None else ctype
        if not isinstance(content_type, str) or len(content_type) > 127:
            raise MessageError(f"content_type must be a str of at most 127 characters, got {content_type!r}")
        return self._row_cls(
            message_id=mid,
            topic=topic,
            key=key,
            payload=bytes(data),
            headers=headers or None,
            content_type=content_type,
            partition=partition_for(key, mid, self.partitions),
            created_at=now,
            available_at=available_at,
            attempts=0,
            status=STATUS_PENDING,
        )

    def _check_headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        if headers is None:
            return {}
        if not isinstance(headers, Mapping):
            raise InvalidHeaders(f"headers must be a mapping of str to str, got {type(headers).__name__}")
        out: dict[str, str] = {}
        size = 0
        for k, v in headers.items():
            if not isinstance(k, str) or not k:
                raise InvalidHeaders(f"header names must be non-empty str, got {type(k).__name__} {k!r}")
            if not isinstance(v, str):
                raise InvalidHeaders(
                    f"header {k!r} must have a str value, got {type(v).__name__} {v!r}"
                )
            size += len(k) + len(v)
            out[k] = v
        if size > _MAX_HEADER_BYTES:
            raise InvalidHeaders(f"headers are {size:,} characters, over the limit of {_MAX_HEADER_BYTES:,}")
        return out

    def _available_at(
        self, deliver_at: dt.datetime | None, delay: dt.timedelta | float | None, now: dt.datetime
    ) -> dt.datetime:
        if deliver_at is not None and delay is not None:
            raise InvalidDeliveryTime("pass deliver_at or delay, not both")
        if delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, (int, float, dt.timedelta)):
                raise InvalidDeliveryTime(f"delay must be a timedelta or seconds, got {type(delay).__name__}")
            seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else float(delay)
            if seconds < 0 or seconds != seconds:
                raise InvalidDeliveryTime(f"delay must not be negative, got {seconds} s")
            return now + dt.timedelta(seconds=seconds) if seconds > 0 else DUE_NOW
        if deliver_at is None:
            return DUE_NOW
        if not isinstance(deliver_at, dt.datetime):
            raise InvalidDeliveryTime(f"deliver_at must be a datetime, got {type(deliver_at).__name__}")
        if deliver_at.tzinfo is None or deliver_at.utcoffset() is None:
            if self.naive_datetimes == "reject":
                raise InvalidDeliveryTime(
                    f"deliver_at {deliver_at.isoformat()} is naive: attach a timezone "
                    "(or configure Outbox(naive_datetimes='utc') to read naive times as UTC)"
                )
            deliver_at = deliver_at.replace(tzinfo=dt.timezone.utc)
        deliver_at = deliver_at.astimezone(dt.timezone.utc)
        if deliver_at < now:
            if not self.allow_past_deliver_at:
                late = (now - deliver_at).total_seconds()
                raise InvalidDeliveryTime(
                    f"deliver_at {deliver_at.isoformat()} is {late:.3f} s in the past; omit it to send now "
                    "or configure Outbox(allow_past_deliver_at=True)"
                )
            return DUE_NOW
        return deliver_at


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _message_id(value: uuid.UUID | str | None) -> uuid.UUID:
    if value is None:
        return uuid7()
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise InvalidMessageId(f"message_id must be a UUID or UUID string, got {type(value).__name__} {value!r}")


def _from_mapping(m: Mapping[str, Any], index: int) -> OutgoingMessage:
    if not isinstance(m, Mapping):
        raise MessageError(f"message #{index}: expected an OutgoingMessage or a mapping, got {type(m).__name__}")
    try:
        return OutgoingMessage(**m)
    except TypeError as exc:
        raise MessageError(f"message #{index}: {exc}") from None


def _sync_session(session: Any) -> Session:
    sync = getattr(session, "sync_session", None)  # AsyncSession
    if isinstance(sync, Session):
        return sync
    if isinstance(session, Session):
        return session
    raise TypeError(f"expected a SQLAlchemy Session or AsyncSession, got {type(session).__name__}")


def _send_notifies(session: Session) -> None:
    channels: set[str] | None = session.info.pop(_NOTIFY_KEY, None)
    if not channels:
        return
    bind = session.connection()
    dialect = dialects.dialect_for(bind)
    if not dialect.supports_notify:
        return
    for channel in sorted(channels):
        dialect.notify(bind, channel)


def _clear_notifies(session: Session) -> None:
    session.info.pop(_NOTIFY_KEY, None)


