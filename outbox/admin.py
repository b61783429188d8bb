"""Operations on the outbox table for people and scripts: status, dead messages, requeue, purge."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ._rows import KNOWN_STATUSES, MAX_PARTITION
from .message import partition_for
from .schema import DUE_NOW, STATUS_DEAD, STATUS_PENDING, STATUS_PUBLISHED, OutboxTables, default_tables
from .writer import DEFAULT_PARTITIONS

__all__ = ["dead_filter", "get_dead", "list_dead", "outbox_status", "purge_dead", "requeue_dead"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def outbox_status(engine: Engine, *, tables: OutboxTables | None = None) -> dict[str, Any]:
    """Pending, due and dead counts, the oldest pending age, live relays and partition leases."""
    t = tables or default_tables()
    o, le, r = t.outbox, t.leases, t.relays
    now = _now()
    with engine.connect() as conn:
        pending, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(o.c.created_at)).where(o.c.status == STATUS_PENDING)
        ).one()
        due = conn.execute(
            sa.select(sa.func.count()).where(o.c.status == STATUS_PENDING, o.c.available_at <= now)
        ).scalar_one()
        retrying = conn.execute(
            sa.select(sa.func.count()).where(o.c.status == STATUS_PENDING, o.c.attempts > 0)
        ).scalar_one()
        delayed = conn.execute(
            sa.select(sa.func.count()).where(o.c.status == STATUS_PENDING, o.c.available_at > now)
        ).scalar_one()
        dead = conn.execute(sa.select(sa.func.count()).where(o.c.status == STATUS_DEAD)).scalar_one()
        published = conn.execute(sa.select(sa.func.count()).where(o.c.status == STATUS_PUBLISHED)).scalar_one()
        unknown = conn.execute(sa.select(sa.func.count()).where(o.c.status.not_in(KNOWN_STATUSES))).scalar_one()
        relays = [dict(row._mapping) for row in conn.execute(sa.select(r).order_by(r.c.relay_id))]
        leases = [dict(row._mapping) for row in conn.execute(sa.select(le).order_by(le.c.relay_group, le.c.partition))]
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.timezone.utc)
    for rel in relays:
        rel["alive"] = rel["expires_at"] is not None and rel["expires_at"] > now
    owners: dict[str, list[int]] = {}
    free_by_group: dict[str, list[int]] = {}
    for lease in leases:
        live = lease["owner"] is not None and lease["expires_at"] is not None and lease["expires_at"] > now
        lease["live"] = live
        if live:
            owners.setdefault(lease["owner"], []).append(lease["partition"])
        else:
            free_by_group.setdefault(lease["relay_group"], []).append(lease["partition"])
    free = sorted({p for parts in free_by_group.values() for p in parts})
    return {
        "pending": pending,
        "due": due,
        "retrying": retrying,
        "waiting": delayed,
        "dead": dead,
        "published": published,
        "unknown_status": unknown,
        "oldest_pending_at": oldest,
        "oldest_pending_age_s": (now - oldest).total_seconds() if oldest is not None else None,
        "relays": relays,
        "partitions": len({lease["partition"] for lease in leases}),
        "partition_owners": owners,
        "unowned_partitions": free,
        "unowned_partitions_by_group": free_by_group,
        "leases": leases,
    }


def dead_filter(
    tables: OutboxTables, *, ids: list[int] | None = None, topic: str | None = None, key: str | None = None,
    older_than: dt.timedelta | None = None,
) -> list[sa.ColumnElement[bool]]:
    o = tables.outbox
    where: list[sa.ColumnElement[bool]] = [o.c.status == STATUS_DEAD]
    if ids:
        where.append(o.c.id.in_(ids))
    if topic is not None:
        where.append(o.c.topic == topic)
    if key is not None:
        where.append(o.c.key == key)
    if older_than is not None:
        where.append(o.c.created_at < _now() - older_than)
    return where


def list_dead(
    engine: Engine, *, tables: OutboxTables | None = None, topic: str | None = None, key: str | None = None,
    older_than: dt.timedelta | None = None, limit: int = 100,
) -> list[dict[str, Any]]:
    t = tables or default_tables()
    o = t.outbox
    cols = [o.c.id, o.c.message_id, o.c.topic, o.c.key, o.c.attempts, o.c.created_at, o.c.last_error]
    q = sa.select(*cols).where(*dead_filter(t, topic=topic, key=key, older_than=older_than)).order_by(o.c.id)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q.limit(limit))]


def get_dead(engine: Engine, row_id: int, *, tables: OutboxTables | None = None) -> dict[str, Any] | None:
    t = tables or default_tables()
    with engine.connect() as conn:
        row = conn.execute(sa.select(t.outbox).where(t.outbox.c.id == row_id)).first()
    return dict(row._mapping) if row is not None else None


def requeue_dead(
    engine: Engine, *, tables: OutboxTables | None = None, ids: list[int] | None = None, topic: str | None = None,
    key: str | None = None, older_than: dt.timedelta | None = None,
) -> int:
    """Make dead rows pending again (attempts reset, due now). Returns how many."""
    t = tables or default_tables()
    o = t.outbox
    where = dead_filter(t, ids=ids, topic=topic, key=key, older_than=older_than)
    with engine.begin() as conn:
        _rederive_partitions(conn, t, where)
        return int(conn.execute(
            o.update().where(*where)
            .values(status=STATUS_PENDING, attempts=0, available_at=DUE_NOW)
        ).rowcount)


def _rederive_partitions(conn: sa.Connection, t: OutboxTables, where: list[sa.ColumnElement[bool]]) -> None:
    """Dead rows whose partition no writer can produce get their key's partition back, as the writer
    computes it with the partition count the relays lease (see :func:`outbox.message.partition_for`)."""
    o, le = t.outbox, t.leases
    count = min(conn.execute(sa.select(sa.func.count(sa.distinct(le.c.partition)))).scalar_one() or DEFAULT_PARTITIONS,
                MAX_PARTITION + 1)
    raw_mid = sa.type_coerce(o.c.message_id, sa.types.NullType()).label("message_id")
    rows = conn.execute(sa.select(o.c.id, o.c.key, raw_mid).where(
        *where, sa.or_(o.c.partition < 0, o.c.partition > MAX_PARTITION))).all()
    for rid, key, mid in rows:
        try:
            mid = mid if isinstance(mid, uuid.UUID) else uuid.UUID(str(mid))
            partition = partition_for(key if isinstance(key, str) else None, mid, count)
        except ValueError:
            partition = rid % count
        conn.execute(o.update().where(o.c.id == rid).values(partition=partition))


def purge_dead(
    engine: Engine, *, tables: OutboxTables | None = None, ids: list[int] | None = None, topic: str | None = None,
    key: str | None = None, older_than: dt.timedelta | None = None,
) -> int:
    """Delete dead rows for good. Returns how many."""
    t = tables or default_tables()
    with engine.begin() as conn:
        return int(conn.execute(
            t.outbox.delete().where(*dead_filter(t, ids=ids, topic=topic, key=key, older_than=older_than))
        ).rowcount)
