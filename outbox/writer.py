"""The writer: adds outbox rows to the caller's SQLAlchemy session and never commits or flushes.

The rows are ordinary pending ORM objects, so they are inserted when the session flushes and
commit or roll back with the business rows, savepoints included (at the flush they are written
with one Core INSERT per table rather than by the ORM's unit of work: see ``_write_pending``).
``Session`` and ``AsyncSession`` work the same way (``add`` is synchronous on both).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, registry

from . import _sqlerrors, dialects
from .errors import (
    ConfigurationError,
    InvalidAttribute,
    InvalidDeliveryTime,
    InvalidHeaders,
    InvalidKey,
    InvalidMessageId,
    InvalidTopic,
    MessageError,
    PayloadTooLarge,
    ReservedHeader,
    SerializationError,
)
from .ids import uuid7
from .message import OutgoingMessage, partition_for
from .schema import DUE_NOW, KEY_LENGTH, STATUS_PENDING, TOPIC_LENGTH, OutboxTables, default_tables
from .serializers import JSONSerializer, Serializer
from .transports.codecs import is_reserved_header, reserved_by

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "DEFAULT_PARTITIONS", "DEFAULT_TOPIC_PATTERN", "Outbox"]

DEFAULT_PARTITIONS = 32
#: payload + key + header bytes of one message: librdkafka's default ``message.max.bytes``.
DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000
DEFAULT_MAX_PAYLOAD = DEFAULT_MAX_PAYLOAD_BYTES  # old name
#: librdkafka's ``message.max.bytes`` cannot go higher; PostgreSQL's bytea stops at 1 GiB.
_MAX_PAYLOAD_CEILING = 1_000_000_000
#: Legal for both Kafka topics and RabbitMQ exchanges.
DEFAULT_TOPIC_PATTERN = rf"[A-Za-z0-9._\-]{{1,{TOPIC_LENGTH}}}"
#: RabbitMQ sends the headers in one content-header frame (frame_max is 128 KiB by default).
_MAX_HEADER_BYTES = 64 * 1024
#: A RabbitMQ header-table field name is a short string: at most 255 bytes.
_MAX_HEADER_NAME_BYTES = 255
_CONTENT_TYPE_LENGTH = 127  # the content_type column is VARCHAR(127)
#: The latest time Python's datetime, MySQL/MariaDB DATETIME and PostgreSQL can all hold.
_LATEST = dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc)
#: The message attributes add() takes, and the longest value of each. ``type``, ``correlation_id`` and
#: ``app_id`` are AMQP short strings on RabbitMQ (at most 255 UTF-8 bytes); ``source`` (a URI-reference)
#: and ``subject`` are CloudEvents attributes, bounded so a row stays small.
_ATTRIBUTE_BYTES = {"type": 255, "source": 2048, "subject": 2048, "correlation_id": 255, "app_id": 255}
_NOTIFY_KEY = "outboxkit.notify_channels"
_IDS_KEY = "outboxkit.message_ids"
_PENDING_KEY = "outboxkit.pending_rows"


class _OutboxRow:
    """Base of the per-table mapped row classes.

    A row is only ever inserted (never loaded, changed or deleted through the ORM), and the ORM
    builds an INSERT from the instance's ``__dict__``, so the values go straight there instead of
    through one instrumented attribute set each.
    """

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


_MAPPED: dict[int, type[_OutboxRow]] = {}
_registry = registry()
_lock = threading.Lock()


def _row_class(tables: OutboxTables) -> type[_OutboxRow]:
    """The mapped class of ``tables.outbox``, made once per table.

    The ORM never writes these rows: they are pending objects only so that whatever flushes the
    session writes them (``_write_pending`` takes them out and inserts their values with Core), and
    the ORM's unit of work never builds an INSERT from them. So ``message_id`` (made by the writer,
    unique: the row's identity before any INSERT) is the only mapped attribute; the other values
    are plain attributes in the instance's ``__dict__``, where ``_write_pending`` reads them. The
    ORM walks every mapped property of a pending object when it is added and again when it is
    expunged (the cascade); with the table's 12 columns mapped that walk was about 7 % of the
    client CPU ``add()`` adds to a one-row transaction (callgrind, docs/benchmarks.md).
    """
    cls = _MAPPED.get(id(tables.outbox))
    if cls is None:
        with _lock:
            cls = _MAPPED.get(id(tables.outbox))
            if cls is None:
                cls = type(f"OutboxRow_{tables.names.outbox}", (_OutboxRow,), {})
                _registry.map_imperatively(cls, tables.outbox, primary_key=[tables.outbox.c.message_id],
                                          include_properties=["message_id"], eager_defaults=False)
                _MAPPED[id(tables.outbox)] = cls
    return cls


#: the session events the writer listens to, registered once on the ``Session`` class (a listener
#: per session instance cost more than the rest of ``add()``)
_LISTENING: set[str] = set()


def _listen_once(what: str, *listeners: tuple[str, Any]) -> None:
    if what in _LISTENING:
        return
    with _lock:
        if what not in _LISTENING:
            for name, fn in listeners:
                event.listen(Session, name, fn)
            _LISTENING.add(what)


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
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        topic_pattern: str = DEFAULT_TOPIC_PATTERN,
        naive_datetimes: str = "reject",
        allow_past_deliver_at: bool = False,
        notify: bool = False,
        default_headers: Mapping[str, str] | None = None,
        source: str | None = None,
        trace_context: bool = True,
    ) -> None:
        if not _is_int(partitions) or not 1 <= partitions <= 32767:
            raise ConfigurationError(f"partitions must be an int between 1 and 32767, got {partitions!r}")
        if not _is_int(max_payload_bytes) or not 1 <= max_payload_bytes <= _MAX_PAYLOAD_CEILING:
            raise ConfigurationError(
                f"max_payload_bytes must be an int between 1 and {_MAX_PAYLOAD_CEILING:,} "
                f"(librdkafka's largest message.max.bytes), got {max_payload_bytes!r}"
            )
        if naive_datetimes not in ("reject", "utc"):
            raise ConfigurationError(f"naive_datetimes must be 'reject' or 'utc', got {naive_datetimes!r}")
        for name, flag in (("allow_past_deliver_at", allow_past_deliver_at), ("notify", notify),
                           ("trace_context", trace_context)):
            if not isinstance(flag, bool):
                raise ConfigurationError(f"{name} must be True or False, got {type(flag).__name__} {flag!r}")
        if serializer is not None and not isinstance(serializer, Serializer):
            raise ConfigurationError(
                f"serializer {serializer!r} has no serialize/deserialize methods (see outbox.Serializer)"
            )
        if tables is not None and not isinstance(tables, OutboxTables):
            raise ConfigurationError(
                f"tables must be an outbox.OutboxTables, e.g. OutboxTables(TableNames(outbox='my_outbox')), "
                f"got {type(tables).__name__} {tables!r}"
            )
        if not isinstance(topic_pattern, str):
            raise ConfigurationError(f"topic_pattern must be a regex str, got {type(topic_pattern).__name__}")
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
        try:
            self.default_headers = self._check_headers(default_headers)
        except InvalidHeaders as exc:
            raise ConfigurationError(f"default_headers: {exc}") from None
        self._default_lower = {k.lower(): k for k in self.default_headers}
        try:
            self.source = None if source is None else _attribute("source", source)
        except InvalidAttribute as exc:
            raise ConfigurationError(f"Outbox(source=...): {exc}") from None
        self.trace_context = trace_context
        self._row_cls = _row_class(self.tables)
        # inline: no RETURNING of the server-made id, which nothing reads (the row's identity is its
        # message_id); PostgreSQL would otherwise send a result back for every add()
        self._insert = sa.insert(self.tables.outbox).inline()
        self._table_key = self.tables.outbox.fullname
        self._dialects: dict[str, dialects.Dialect] = {}  # by SQLAlchemy dialect name
        for t in self.tables.all():
            _sqlerrors.known_table(t.name, outbox=t is self.tables.outbox)

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
        type: str | None = None,
        source: str | None = None,
        subject: str | None = None,
        correlation_id: str | None = None,
        app_id: str | None = None,
    ) -> uuid.UUID:
        """Add one message to ``session`` (a ``Session`` or ``AsyncSession``); return its id.

        Nothing is flushed or committed: the row is written with the session's next flush and
        commits or rolls back with everything else in the transaction.

        ``type``, ``source`` (default: ``Outbox(source=...)``), ``subject``, ``correlation_id`` and
        ``app_id`` are message attributes: stored only when given, and put on the wire by the relay's
        codec (CloudEvents ``ce_type``/``ce_source``/``ce_subject``; AMQP ``type``, ``correlation_id``,
        ``app_id`` properties; Kafka headers). With ``opentelemetry-api`` installed and a span active,
        its W3C trace context is stored too (``Outbox(trace_context=False)`` turns that off).
        """
        row = self._row_cls(**self._values(
            OutgoingMessage(topic, payload, key, headers, message_id, deliver_at, delay, content_type,
                            type, source, subject, correlation_id, app_id),
            _now(), self._trace(),
        ))
        self._attach(session, [row])
        return row.message_id  # type: ignore[attr-defined,no-any-return]

    def add_many(self, session: Any, messages: Iterable[OutgoingMessage | Mapping[str, Any]]) -> list[uuid.UUID]:
        """Validate every message, then add them all (or none, if one is invalid); return their ids.

        On a ``Session`` the rows are written at once, in the session's transaction, with one
        ``executemany`` of a plain INSERT (after a flush of what the session holds, so that rows
        keep the order their messages were added in); they commit or roll back (savepoints
        included) with everything else. On an ``AsyncSession``, which cannot do I/O here, they are
        written with its next flush, as :meth:`add`'s are.
        """
        now = _now()
        trace = self._trace()
        rows: list[dict[str, Any]] = []
        seen: dict[uuid.UUID, int] = {}
        for i, m in enumerate(messages):
            msg = m if isinstance(m, OutgoingMessage) else _from_mapping(m, i)
            try:
                row = self._values(msg, now, trace)
                mid: uuid.UUID = row["message_id"]
                if mid in seen:
                    raise InvalidMessageId(
                        f"message_id {mid} is also the id of message #{seen[mid]}: every message needs its own id"
                    )
            except MessageError as exc:
                exc.args = (f"message #{i}: {exc.args[0]}",)
                raise
            seen[mid] = i
            rows.append(row)
        sync = _sync_session(session)
        if sync is session and rows:
            self._write_now(sync, rows)
        else:
            self._attach(session, [self._row_cls(**r) for r in rows])
        return [r["message_id"] for r in rows]

    # ------------------------------------------------------------------ internals
    def _attach(self, session: Any, rows: list[_OutboxRow]) -> None:
        sync = _sync_session(session)
        ids = [row.message_id for row in rows]  # type: ignore[attr-defined]
        added = self._unused_ids(sync, ids)
        for mid, row in zip(ids, rows, strict=True):
            added[(self._table_key, mid)] = row
        sync.add_all(rows)
        pending: list[tuple[Outbox, list[_OutboxRow]]] | None = sync.info.get(_PENDING_KEY)
        if pending is None:
            _listen_once("flush", ("before_flush", _write_pending))
            pending = sync.info[_PENDING_KEY] = []
        pending.append((self, rows))
        if self.notify:
            self._arm_notify(sync)

    def _write_now(self, sync: Session, rows: list[dict[str, Any]]) -> None:
        """``add_many`` on a ``Session``: one Core ``executemany`` in its transaction, no ORM rows."""
        added = self._unused_ids(sync, [r["message_id"] for r in rows])
        sync.flush()  # rows added before (add()) get their ids first: the relay sends in id order
        self._insert_rows(sync, rows, added)
        if self.notify:
            self._arm_notify(sync)

    def _insert_rows(self, sync: Session, rows: list[dict[str, Any]],
                     added: dict[tuple[str, uuid.UUID], _OutboxRow | _Written]) -> None:
        """Insert ``rows`` (column values) in ``sync``'s transaction and note them in ``added`` as written there."""
        for column in ("headers", "attributes"):  # NULL when left out: fewer values to bind and send
            if all(r[column] is None for r in rows):
                for r in rows:
                    del r[column]
        connection = sync.connection(bind_arguments={"clause": self._insert})
        dialect = self._dialects.get(connection.dialect.name)
        if dialect is None:
            dialect = self._dialects[connection.dialect.name] = dialects.dialect_for(connection)
        dialect.insert_rows(connection, self._insert, rows)
        written = _Written(sync.get_nested_transaction() or sync.get_transaction())
        key = self._table_key
        for r in rows:
            added[(key, r["message_id"])] = written

    def _unused_ids(self, sync: Session, ids: list[uuid.UUID]) -> dict[tuple[str, uuid.UUID], _OutboxRow | _Written]:
        """Refuse an id already added in this session's transaction; return the ids added so far
        (:meth:`_added_ids`), for the caller to note these in once they are added."""
        added = self._added_ids(sync)
        key = self._table_key
        for i, mid in enumerate(ids):
            if (key, mid) in added:
                where = f"message #{i}: " if len(ids) > 1 else ""
                raise InvalidMessageId(
                    f"{where}message_id {mid} was already added in this session's transaction: "
                    "every message needs its own id"
                )
        return added

    def _added_ids(self, sync: Session) -> dict[tuple[str, uuid.UUID], _OutboxRow | _Written]:
        """The outbox rows this session's transaction holds, by id (kept until commit or rollback).

        The first call on a session also makes sure that database errors about the toolkit's
        tables (a forgotten ``db upgrade``, an id committed earlier) are explained at flush.
        """
        info = sync.info
        added: dict[tuple[str, uuid.UUID], _OutboxRow | _Written] | None = info.get(_IDS_KEY)
        if added is None:
            _listen_once("ids", ("after_transaction_end", _forget_ids), ("after_soft_rollback", _prune_ids))
            added = info[_IDS_KEY] = {}
            _explain_errors_for(sync, self._row_cls)
        return added

    def _arm_notify(self, sync: Session) -> None:
        channels: set[str] | None = sync.info.get(_NOTIFY_KEY)
        if channels is None:
            _listen_once("notify", ("before_commit", _send_notifies), ("after_rollback", _clear_notifies))
            channels = sync.info[_NOTIFY_KEY] = set()
        channels.add(self.notify_channel)

    def _trace(self) -> dict[str, str] | None:
        """The active span's trace context to store (once per call: every message of it shares the span)."""
        return _trace_context() if self.trace_context else None

    def _values(self, msg: OutgoingMessage, now: dt.datetime, trace: dict[str, str] | None) -> dict[str, Any]:
        """The checked column values of ``msg``'s row (raises a :class:`MessageError` for bad input)."""
        topic = self._check_topic(msg.topic)
        key = msg.key
        key_bytes = 0
        if key is not None:
            if not isinstance(key, str):
                raise InvalidKey(
                    f"key must be a str or None, got {type(key).__name__} {key!r}; convert it with str()"
                )
            key_bytes = _text_bytes(key, "key", InvalidKey)
            if key_bytes > KEY_LENGTH or key == "":
                raise InvalidKey(
                    f"key must be 1-{KEY_LENGTH} UTF-8 bytes (a RabbitMQ routing key's limit; the key column "
                    f"is VARCHAR({KEY_LENGTH})), got {key_bytes} bytes"
                )
        headers = self._check_headers(msg.headers)
        if self.default_headers:
            headers = self._with_defaults(headers)
        attributes = self._attributes(msg, trace)
        mid = _message_id(msg.message_id)
        available_at = self._available_at(msg.deliver_at, msg.delay, now)
        data, ctype = self._serialize(msg.payload)
        header_bytes = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in headers.items())
        if attributes:  # they travel as headers on Kafka
            header_bytes += sum(len(k) + len(v.encode("utf-8")) for k, v in attributes.items())
        total = len(data) + key_bytes + header_bytes
        if total > self.max_payload_bytes:
            raise PayloadTooLarge(total, self.max_payload_bytes, payload=len(data), key=key_bytes, headers=header_bytes)
        content_type = msg.content_type if msg.content_type is not None else ctype
        if not isinstance(content_type, str):
            raise InvalidHeaders(f"content_type must be a str, got {type(content_type).__name__} {content_type!r}")
        _text_bytes(content_type, "content_type", InvalidHeaders)
        if len(content_type) > _CONTENT_TYPE_LENGTH:
            raise InvalidHeaders(
                f"content_type must be at most {_CONTENT_TYPE_LENGTH} characters (the content_type column is "
                f"VARCHAR({_CONTENT_TYPE_LENGTH})), got {len(content_type)}"
            )
        return {
            "message_id": mid,
            "topic": topic,
            "key": key,
            "payload": data,
            "headers": headers or None,
            "attributes": attributes,
            "content_type": content_type,
            "partition": partition_for(key, mid, self.partitions),
            "created_at": now,
            "available_at": available_at,
            "attempts": 0,
            "status": STATUS_PENDING,
        }

    def _with_defaults(self, headers: dict[str, str]) -> dict[str, str]:
        """``default_headers`` under the message's own; a message header overrides a default one whatever its case."""
        if not headers:
            return dict(self.default_headers)
        lower = self._default_lower
        if any(k.lower() in lower for k in headers):
            given = {k.lower() for k in headers}
            return {**{k: v for k, v in self.default_headers.items() if k.lower() not in given}, **headers}
        return {**self.default_headers, **headers}

    def _attributes(self, msg: OutgoingMessage, trace: dict[str, str] | None) -> dict[str, str] | None:
        """The row's ``attributes``: only the ones given (None, no bytes in the row, when there are none)."""
        out: dict[str, str] | None = None
        source = msg.source if msg.source is not None else self.source
        for name, value in (("type", msg.type), ("source", source), ("subject", msg.subject),
                            ("correlation_id", msg.correlation_id), ("app_id", msg.app_id)):
            if value is not None:
                if out is None:
                    out = {}
                out[name] = value if value is self.source else _attribute(name, value)
        if trace:
            out = dict(trace) if out is None else {**out, **trace}
        return out

    def _check_topic(self, topic: object) -> str:
        if not isinstance(topic, str):
            raise InvalidTopic(f"topic must be a str, got {type(topic).__name__} {topic!r}")
        if not self._topic_re.fullmatch(topic):
            rule = ("letters, digits, '.', '_' and '-', at most 249 characters"
                    if self.topic_pattern == DEFAULT_TOPIC_PATTERN else "your Outbox(topic_pattern=...)")
            raise InvalidTopic(
                f"topic {topic!r} is not a valid topic/exchange name: it must match {self.topic_pattern!r} ({rule})"
            )
        _text_bytes(topic, "topic", InvalidTopic)
        if len(topic) > TOPIC_LENGTH:
            raise InvalidTopic(
                f"topic is {len(topic)} characters, over the limit of {TOPIC_LENGTH}: the outbox table's topic "
                f"column is VARCHAR({TOPIC_LENGTH}), Kafka's limit for a topic name"
            )
        return topic

    def _serialize(self, payload: Any) -> tuple[bytes, Any]:
        what = type(payload).__qualname__
        try:
            data, ctype = self.serializer.serialize(payload)
        except MessageError:
            raise
        except UnicodeEncodeError as exc:
            raise SerializationError(
                f"cannot serialise payload of type {what!r}: it contains a lone surrogate "
                f"{exc.object[exc.start:exc.end]!r}, which is not valid UTF-8 (text mis-decoded from bytes?)"
            ) from exc
        except Exception as exc:
            raise SerializationError(f"cannot serialise payload of type {what!r}: {exc}") from exc
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SerializationError(f"serializer returned {type(data).__name__}, not bytes, for a {what!r}")
        return bytes(data), ctype

    def _check_headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        if headers is None:
            return {}
        if not isinstance(headers, Mapping):
            raise InvalidHeaders(f"headers must be a mapping of str to str, got {type(headers).__name__}")
        out: dict[str, str] = {}
        size = 0
        seen: dict[str, str] = {}
        for k, v in headers.items():
            if not isinstance(k, str) or not k:
                raise InvalidHeaders(f"header names must be non-empty str, got {type(k).__name__} {k!r}")
            lower = k.lower()
            # a name some registered codec writes itself (any case) would be dropped, or contradict the
            # codec's, on one broker or another: the codecs registry is the one list of them
            if is_reserved_header(k):
                raise ReservedHeader(_reserved_reason(k, lower))
            if lower in seen:
                raise ReservedHeader(
                    f"headers {seen[lower]!r} and {k!r} differ only in case: brokers and consumers compare header "
                    "names case-insensitively (AMQP, HTTP bindings), so one would hide the other; keep one"
                )
            seen[lower] = k
            name_bytes = _text_bytes(k, f"header name {k!r}", InvalidHeaders)
            if name_bytes > _MAX_HEADER_NAME_BYTES:
                raise InvalidHeaders(
                    f"header name {k[:40]!r}... is {name_bytes} UTF-8 bytes, over the limit of "
                    f"{_MAX_HEADER_NAME_BYTES} (a RabbitMQ header name is a short string)"
                )
            if not isinstance(v, str):
                raise InvalidHeaders(
                    f"header {k!r} must have a str value, got {type(v).__name__} {v!r}; convert it with str()"
                )
            size += name_bytes + _text_bytes(v, f"header {k!r}", InvalidHeaders)
            out[k] = v
        if size > _MAX_HEADER_BYTES:
            raise InvalidHeaders(
                f"headers are {size:,} UTF-8 bytes, over the limit of {_MAX_HEADER_BYTES:,} "
                "(RabbitMQ sends them in one frame); put large data in the payload"
            )
        return out

    def _available_at(
        self, deliver_at: dt.datetime | None, delay: dt.timedelta | float | None, now: dt.datetime
    ) -> dt.datetime:
        if deliver_at is not None and delay is not None:
            raise InvalidDeliveryTime("pass deliver_at or delay, not both")
        if delay is not None:
            return _after_delay(delay, now)
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
        try:
            deliver_at = deliver_at.astimezone(dt.timezone.utc)
        except (OverflowError, ValueError) as exc:
            raise InvalidDeliveryTime(
                f"deliver_at {deliver_at.isoformat()} cannot be expressed in UTC ({exc}): "
                "the latest time the databases can store is 9999-12-31 23:59:59 UTC"
            ) from None
        if deliver_at < now:
            if not self.allow_past_deliver_at:
                late = (now - deliver_at).total_seconds()
                raise InvalidDeliveryTime(
                    f"deliver_at {deliver_at.isoformat()} is {late:.3f} s in the past; omit it to send now "
                    "or configure Outbox(allow_past_deliver_at=True)"
                )
            return DUE_NOW
        return deliver_at


def _reserved_reason(name: str, lower: str) -> str:
    if lower == "message-id":
        why = "the relay writes the message id there; pass message_id=... instead"
    elif lower == "content-type":
        why = "the relay writes the content type there; pass content_type=... instead"
    elif lower in ("traceparent", "tracestate"):
        why = ("the relay writes the W3C trace context there, captured from the active OpenTelemetry span at "
               "add(); start a span around add() instead")
    elif lower == "id":
        why = "the debezium codec writes the message id there; pass message_id=... instead"
    elif lower in ("message-type", "correlation-id", "app-id"):
        why = (f"the native codec writes the {lower.replace('-', '_').replace('message_', '')} attribute there on "
               f"Kafka; pass {lower.replace('-', '_').replace('message_', '')}=... instead")
    elif not lower.startswith(("ce_", "ce-", "cloudevents_", "cloudevents:")):
        why = f"the {reserved_by(name) or 'a registered'} codec writes a header by that name"
    else:
        why = ("the cloudevents codec writes CloudEvents attributes under the ce_ / ce- / cloudEvents_ / cloudEvents: "
               "prefixes; pass type=, source=, subject= instead, or rename the header")
    return f"header {name!r} is reserved (names are compared case-insensitively): {why}"


def _attribute(name: str, value: object) -> str:
    """One message attribute, checked: a non-empty str within its bound, no NUL or lone surrogate."""
    if not isinstance(value, str):
        raise InvalidAttribute(f"{name} must be a str or None, got {type(value).__name__} {value!r}")
    size = _text_bytes(value, name, InvalidAttribute)
    limit = _ATTRIBUTE_BYTES[name]
    if not value or size > limit:
        raise InvalidAttribute(f"{name} must be 1-{limit} UTF-8 bytes, got {size} bytes")
    return value


#: the longest tracestate W3C Trace Context asks propagators to keep
_TRACESTATE_LENGTH = 512
#: OpenTelemetry, once looked for: None = not yet, False = not installed, else (get_current_span, propagator)
_OTEL: Any = None


def _load_otel() -> Any:
    try:
        from opentelemetry.trace import get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return False
    return get_current_span, TraceContextTextMapPropagator()


def _trace_context() -> dict[str, str] | None:
    """W3C ``traceparent`` (and a non-empty ``tracestate``) of the active span, if OpenTelemetry is installed."""
    global _OTEL
    otel = _OTEL
    if otel is None:
        otel = _OTEL = _load_otel()
    if otel is False:
        return None
    get_current_span, propagator = otel
    if not get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagator.inject(carrier)
    out = {k: carrier[k] for k in ("traceparent", "tracestate") if carrier.get(k)}
    if len(out.get("tracestate", "")) > _TRACESTATE_LENGTH:  # W3C: a longer one may be dropped anywhere
        del out["tracestate"]
    return out or None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_bytes(value: str, what: str, error: type[MessageError]) -> int:
    """UTF-8 length of ``value``, or ``error`` if a database would reject it.

    PostgreSQL stores no NUL in text or JSONB; no database (nor Kafka, nor RabbitMQ) stores a lone
    surrogate, which is not valid UTF-8. Every other str is valid UTF-8, so it fits MySQL's utf8mb4.
    """
    if "\x00" in value:
        raise error(f"{what} contains NUL (\\x00) at position {value.index(chr(0))}: PostgreSQL cannot store it")
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise error(
            f"{what} contains a lone surrogate {value[exc.start]!r} at position {exc.start}: it is not valid "
            "UTF-8 (text mis-decoded from bytes, e.g. with errors='surrogateescape'?)"
        ) from None


def _after_delay(delay: object, now: dt.datetime) -> dt.datetime:
    if isinstance(delay, bool) or not isinstance(delay, (int, float, dt.timedelta)):
        raise InvalidDeliveryTime(f"delay must be a timedelta or seconds, got {type(delay).__name__}")
    if isinstance(delay, dt.timedelta):
        step = delay
    else:
        try:
            seconds = float(delay)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds):
            raise InvalidDeliveryTime(f"delay must be a finite number of seconds, got {str(delay)[:40]}")
        if seconds < 0:
            raise InvalidDeliveryTime(f"delay must not be negative, got {seconds} s")
        try:
            step = dt.timedelta(seconds=seconds)
        except OverflowError:
            step = dt.timedelta.max
    if step < dt.timedelta(0):
        raise InvalidDeliveryTime(f"delay must not be negative, got {step.total_seconds()} s")
    if not step:
        return DUE_NOW
    if step > _LATEST - now:
        raise InvalidDeliveryTime(
            f"delay {str(delay)[:40]} puts the delivery time after 9999-12-31 23:59:59 UTC, the latest time the "
            "databases can store"
        )
    return now + step


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


def _info(session: Session) -> dict[Any, Any] | None:
    """``session.info`` if the session has one yet (the class-level listeners run for every session of
    the application: they must not create a dict on sessions the writer never saw)."""
    return session.__dict__.get("info")


def _send_notifies(session: Session) -> None:
    info = _info(session)
    channels: set[str] | None = info.pop(_NOTIFY_KEY, None) if info else None
    if not channels:
        return
    bind = session.connection()
    dialect = dialects.dialect_for(bind)
    if not dialect.supports_notify:
        return
    for channel in sorted(channels):
        dialect.notify(bind, channel)


def _write_pending(session: Session, _flush_context: Any, instances: Any) -> None:
    """``before_flush``: the outbox rows ``add()`` put in the session, written with one Core INSERT per
    table instead of the ORM's unit of work.

    They stay ordinary pending objects until the session flushes, so everything that flushes
    (``flush()``, autoflush before a query, ``begin_nested()``, ``commit()``) writes them, and a
    rolled-back savepoint drops the ones added in it, as before. Here each is taken out of the
    session (``expunge``: the ORM then has nothing to do for it) and its values are inserted in the
    flush's transaction, in the order they were added. The ORM's INSERT of one such row cost about
    three times the statement itself in client CPU (state tracking, dependency sort, identity map,
    expiry at commit).
    """
    info = _info(session)
    pending: list[tuple[Outbox, list[_OutboxRow]]] | None = info.pop(_PENDING_KEY, None) if info else None
    if not pending:
        return
    only = None if instances is None else {id(o) for o in instances}
    later: list[tuple[Outbox, list[_OutboxRow]]] = []
    by_box: dict[int, tuple[Outbox, list[_OutboxRow]]] = {}
    for box, rows in pending:
        for row in rows:
            if row not in session:  # a rolled-back savepoint, or the application, took it out
                continue
            if only is not None and id(row) not in only:
                later.append((box, [row]))
                continue
            entry = by_box.get(id(box))
            if entry is None:
                entry = by_box[id(box)] = (box, [])
            entry[1].append(row)
    if later:
        info[_PENDING_KEY] = later  # type: ignore[index]
    if not by_box:
        return
    added = info[_IDS_KEY]  # type: ignore[index]
    for box, rows in by_box.values():
        for row in rows:
            session.expunge(row)
        values = [{k: v for k, v in row.__dict__.items() if k != "_sa_instance_state"} for row in rows]
        box._insert_rows(session, values, added)


def _clear_notifies(session: Session) -> None:
    info = _info(session)
    if info:
        info.pop(_NOTIFY_KEY, None)


def _forget_ids(session: Session, transaction: Any) -> None:
    """The whole transaction ended (committed or rolled back): its ids are the table's business now."""
    info = _info(session)
    added = info.get(_IDS_KEY) if info else None
    if transaction.parent is None:
        if added:
            added.clear()
        if info:
            info.pop(_PENDING_KEY, None)  # flushed at commit, or gone with the rollback


def _prune_ids(session: Session, previous_transaction: Any) -> None:
    """After a rollback (savepoint or whole transaction), keep only the rows still in the session."""
    info = _info(session)
    added = info.get(_IDS_KEY) if info else None
    if added:
        for k in [k for k, row in added.items()
                  if (row.rolled_back_with(previous_transaction) if isinstance(row, _Written) else row not in session)]:
            del added[k]


class _Written:
    """Rows ``add_many`` wrote at once: the session transaction (or savepoint) they were written in."""

    __slots__ = ("transaction",)

    def __init__(self, transaction: Any) -> None:
        self.transaction = transaction

    def rolled_back_with(self, rolled_back: Any) -> bool:
        """Whether rolling ``rolled_back`` back undid these rows: it is their transaction or one around it."""
        t = self.transaction
        while t is not None:
            if t is rolled_back:
                return True
            t = t.parent
        return False


def _explain_errors_for(sync: Session, row_cls: type[_OutboxRow]) -> None:
    bind = None if sync.binds else sync.bind  # one bind for everything: get_bind's answer, without its cost
    try:
        if bind is None:
            bind = sync.get_bind(mapper=row_cls)
    except Exception:  # an unbound session: it fails at flush with SQLAlchemy's own error
        return
    engine = getattr(bind, "engine", None)
    if engine is not None:
        _sqlerrors.explain_errors(engine)


