"""The dead-letter table: messages a consumer gave up on, and the functions behind ``outbox dead``.

A row's ``status`` is ``dead`` (given up), ``requeued`` (waiting for a running consumer with that
name, or :meth:`DedupConsumer.process_requeued`, to try it again) or ``resolved`` (the retry
succeeded, or found that the message had in fact been processed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import traceback as tb
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox._dberrors import is_transient
from outbox._redact import mask_secrets
from outbox.dialects import dialect_for
from outbox.errors import ConfigurationError
from outbox.incoming import IncomingMessage, bounded_text, id_text, storable_id, text_form
from outbox.schema import KEY_LENGTH, STATUS_DEAD, TOPIC_LENGTH, OutboxTables, default_tables

__all__ = [
    "STATUS_REQUEUED",
    "STATUS_RESOLVED",
    "get_dead_letter",
    "list_dead_letters",
    "purge_dead_letters",
    "requeue_dead_letters",
]

STATUS_REQUEUED = "requeued"
STATUS_RESOLVED = "resolved"
_STATUSES = (STATUS_DEAD, STATUS_REQUEUED, STATUS_RESOLVED)
_MAX_ERROR = 4000
_MAX_TRACEBACK = 8000
CONTENT_TYPE_LENGTH = 127


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _clean(text: str) -> str:
    """Text any database stores: NUL written ``\\x00``, lone surrogates as ``\\udcXX``."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _storable(text: str) -> str:
    """``text`` when a database stores it as it is, else its lossless :func:`text_form`."""
    if "\x00" not in text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return text
    return text_form(text)


def describe_error(exc: BaseException) -> tuple[str, str]:
    """``(one-line error, traceback summary)``, credentials masked, both bounded in size, storable."""
    error = _clean(mask_secrets(f"{type(exc).__name__}: {exc}"))[:_MAX_ERROR]
    text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    return error, _clean(mask_secrets(text))[-_MAX_TRACEBACK:]


def fingerprint(message: IncomingMessage) -> str:
    """What identifies one message without an id across its redeliveries (for insert-if-absent).

    A partitioned log (Kafka): topic, partition and offset. Otherwise (RabbitMQ redelivers with a new delivery tag):
    exchange, routing key, payload and headers.
    """
    h = hashlib.sha256()
    if message.ordered_by_partition and message.partition is not None and message.offset is not None:
        parts: list[bytes] = [str(message.broker).encode(), message.topic.encode("utf-8", "surrogatepass"),
                              str(message.partition).encode(), str(message.offset).encode()]
    else:
        headers = json.dumps(sorted((str(k), str(v)) for k, v in message.headers.items()))
        parts = [str(message.broker).encode(), message.topic.encode("utf-8", "surrogatepass"),
                 b"\x00" if message.key is None else b"\x01" + message.key.encode("utf-8", "surrogatepass"),
                 bytes(message.payload), headers.encode("utf-8", "surrogatepass")]
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def dead_letter_values(
    consumer: str,
    message: IncomingMessage,
    error: str,
    trace: str,
    *,
    attempts: int,
    first_failed_at: dt.datetime,
    now: dt.datetime,
) -> dict[str, Any]:
    """The dead-letter row of ``message``, every value fitted to its column.

    Over-long texts (message id, topic, key, content type) get their :func:`bounded_text` form
    (a stable prefix + SHA-256), NUL and bytes that are not UTF-8 their escaped form.
    """
    mid = message.id if isinstance(message.id, str) and message.id.strip() else None
    source = {k: (_storable(v) if isinstance(v, str) else v) for k, v in message.source.items()}
    if mid is None:
        source["fingerprint"] = fingerprint(message)
    return {
        "consumer": consumer,
        "message_id": None if mid is None else (mid if storable_id(mid) else id_text(mid)),
        "topic": bounded_text(message.topic, TOPIC_LENGTH),
        "key": None if message.key is None else bounded_text(message.key, KEY_LENGTH),
        "payload": bytes(message.payload),
        "headers": {_storable(str(k)): _storable(str(v)) for k, v in message.headers.items()} or None,
        "content_type": None if message.content_type is None else bounded_text(message.content_type,
                                                                                CONTENT_TYPE_LENGTH),
        "source": source,
        "error": error,
        "traceback": trace,
        "attempts": attempts,
        "first_failed_at": first_failed_at,
        "last_failed_at": now,
        "status": STATUS_DEAD,
    }


def _existing(conn: Connection, t: sa.Table, values: dict[str, Any]) -> int | None:
    """The open (dead or requeued) dead letter of the same message and consumer, if there is one.

    The table has no unique key for it, so concurrent dead letters of one message (two processes
    of the consumer, a redelivery while the first one's transaction is open) are serialized: a lock
    on the (consumer, message) name (PostgreSQL), and a locking read (MySQL/MariaDB, which waits for
    a concurrent insert it meets; two reads both before either insert end in a deadlock, a transient
    error the runner retries). The second one then finds the first one's committed row.
    """
    open_ = (t.c.consumer == values["consumer"], t.c.status.in_((STATUS_DEAD, STATUS_REQUEUED)))
    mid = values["message_id"]
    fp = values["source"].get("fingerprint") if mid is None else None
    dialect_for(conn).lock_name(conn, "\x00".join(
        (t.fullname, values["consumer"], "id" if mid is not None else "fingerprint", mid or fp or "")
    ).encode("utf-8", "surrogatepass"))
    if mid is not None:
        return conn.execute(
            sa.select(t.c.id).where(*open_, t.c.message_id == mid).order_by(t.c.id).limit(1).with_for_update()
        ).scalar()
    key = t.c.key.is_(None) if values["key"] is None else t.c.key == values["key"]
    rows = conn.execute(
        sa.select(t.c.id, t.c.source).where(*open_, t.c.message_id.is_(None), t.c.topic == values["topic"], key)
        .order_by(t.c.id).with_for_update()
    )
    for dead_id, source in rows:
        if isinstance(source, dict) and source.get("fingerprint") == fp:
            return int(dead_id)
    return None


def record_dead_letter(
    conn: Connection,
    tables: OutboxTables,
    consumer: str,
    message: IncomingMessage,
    exc: BaseException,
    *,
    attempts: int,
    first_failed_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Insert a dead letter, or for a requeued message put its row back to ``dead`` with the new error.

    Idempotent: when the same message (same id, or for a message without id the same
    :func:`fingerprint`) already has an open dead letter of this consumer, that row is updated
    (error, attempts, last failure), so a redelivery after a lost ack or a crash writes no second
    row. A row the database refuses for its values (a data error) is stored again without the
    refused parts, with the reason; a database outage propagates (the caller retries the batch).
    """
    now = now or _now()
    error, trace = describe_error(exc)
    t = tables.dead_letters
    if message.dead_letter_id is not None:
        conn.execute(
            t.update()
            .where(t.c.id == message.dead_letter_id)
            .values(status=STATUS_DEAD, error=error, traceback=trace, attempts=t.c.attempts + attempts,
                    last_failed_at=now)
        )
        return
    values = dead_letter_values(consumer, message, error, trace, attempts=attempts,
                                first_failed_at=first_failed_at or now, now=now)
    dialect_for(conn).ensure_transaction(conn)
    existing = _existing(conn, t, values)
    if existing is not None:
        conn.execute(t.update().where(t.c.id == existing).values(
            error=error, traceback=trace, attempts=t.c.attempts + attempts, last_failed_at=now))
        return
    try:
        with conn.begin_nested():
            conn.execute(t.insert().values(**values))
    except sa.exc.StatementError as refused:
        if is_transient(refused):
            raise
        reason = _clean(mask_secrets(f"{type(refused).__name__}: {refused}"))[:1000]
        values.update(headers=None, content_type=None, payload=b"",
                      error=f"{error[: _MAX_ERROR - 1200]} [dead letter stored without payload, headers and "
                            f"content type: {reason}]")
        conn.execute(t.insert().values(**values))


def mark_resolved(conn: Connection, tables: OutboxTables, dead_id: int) -> None:
    t = tables.dead_letters
    conn.execute(t.update().where(t.c.id == dead_id).values(status=STATUS_RESOLVED))


def requeued_messages(conn: Connection, tables: OutboxTables, consumer: str, limit: int) -> list[IncomingMessage]:
    """Rows of ``consumer`` marked ``requeued``, as messages that carry their dead-letter id."""
    t = tables.dead_letters
    rows = conn.execute(
        sa.select(t).where(t.c.consumer == consumer, t.c.status == STATUS_REQUEUED).order_by(t.c.id).limit(limit)
    ).mappings()
    out = []
    for r in rows:
        source = dict(r["source"] or {})
        out.append(
            IncomingMessage(
                id=r["message_id"],
                topic=r["topic"],
                key=r["key"],
                payload=bytes(r["payload"]),
                headers=dict(r["headers"] or {}),
                content_type=r["content_type"],
                partition=source.get("partition"),
                offset=source.get("offset"),
                broker="requeue",
                dead_letter_id=int(r["id"]),
                first_failed_at=r["first_failed_at"],
                attempt=1,
            )
        )
    return out


# ------------------------------------------------------------------ the `outbox dead` functions


def _filters(
    t: sa.Table,
    *,
    consumer: str | None,
    topic: str | None,
    key: str | None,
    older_than: dt.timedelta | None,
    status: str | None,
) -> list[sa.ColumnElement[bool]]:
    if older_than is not None and (not isinstance(older_than, dt.timedelta) or older_than < dt.timedelta(0)):
        raise ConfigurationError(f"older_than must be a non-negative timedelta, got {older_than!r}")
    if status is not None and status not in _STATUSES:
        raise ConfigurationError(f"status must be one of {', '.join(_STATUSES)}, got {status!r}")
    conds: list[sa.ColumnElement[bool]] = []
    if consumer is not None:
        conds.append(t.c.consumer == consumer)
    if topic is not None:
        conds.append(t.c.topic == topic)
    if key is not None:
        conds.append(t.c.key == key)
    if older_than is not None:
        conds.append(t.c.last_failed_at < _now() - older_than)
    if status is not None:
        conds.append(t.c.status == status)
    return conds


def list_dead_letters(
    engine: sa.Engine,
    *,
    tables: OutboxTables | None = None,
    consumer: str | None = None,
    topic: str | None = None,
    key: str | None = None,
    older_than: dt.timedelta | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Dead letters matching every filter given, oldest first (payload and traceback left out)."""
    if not isinstance(limit, int) or limit <= 0:
        raise ConfigurationError(f"limit must be a positive int, got {limit!r}")
    t = (tables or default_tables()).dead_letters
    conds = _filters(t, consumer=consumer, topic=topic, key=key, older_than=older_than, status=status)
    cols = [c for c in t.c if c.name not in ("payload", "traceback")]
    with engine.connect() as conn:
        rows = conn.execute(sa.select(*cols).where(*conds).order_by(t.c.id).limit(limit)).mappings().all()
    return [dict(r) for r in rows]


def get_dead_letter(engine: sa.Engine, dead_id: int, *, tables: OutboxTables | None = None) -> dict[str, Any] | None:
    """One dead letter with every column (payload as bytes), or ``None``."""
    t = (tables or default_tables()).dead_letters
    with engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.id == int(dead_id))).mappings().first()
    if row is None:
        return None
    out = dict(row)
    out["payload"] = bytes(out["payload"])
    return out


def requeue_dead_letters(
    engine: sa.Engine,
    *,
    consumer: str,
    ids: Sequence[int] | None = None,
    topic: str | None = None,
    key: str | None = None,
    older_than: dt.timedelta | None = None,
    tables: OutboxTables | None = None,
) -> int:
    """Mark matching ``dead`` rows of ``consumer`` as ``requeued``; return how many.

    A running consumer of that name picks them up (runners check periodically), or call
    :meth:`DedupConsumer.process_requeued`. They go through the same dedup algorithm, so a message
    that was in fact processed stays a no-op.
    """
    if not consumer or not isinstance(consumer, str):
        raise ConfigurationError("consumer is required: requeued rows go back to the consumer of that name")
    t = (tables or default_tables()).dead_letters
    conds = _filters(t, consumer=consumer, topic=topic, key=key, older_than=older_than, status=STATUS_DEAD)
    if ids is not None:
        conds.append(t.c.id.in_([int(i) for i in ids]))
    with engine.begin() as conn:
        return int(conn.execute(t.update().where(*conds).values(status=STATUS_REQUEUED)).rowcount)


def purge_dead_letters(
    engine: sa.Engine,
    *,
    consumer: str | None = None,
    ids: Sequence[int] | None = None,
    topic: str | None = None,
    key: str | None = None,
    older_than: dt.timedelta | None = None,
    status: str | None = None,
    tables: OutboxTables | None = None,
) -> int:
    """Delete matching dead letters (any status unless ``status`` is given); return how many."""
    t = (tables or default_tables()).dead_letters
    conds = _filters(t, consumer=consumer, topic=topic, key=key, older_than=older_than, status=status)
    if ids is not None:
        conds.append(t.c.id.in_([int(i) for i in ids]))
    with engine.begin() as conn:
        return int(conn.execute(t.delete().where(*conds)).rowcount)
