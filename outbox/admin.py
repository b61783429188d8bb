"""Operations on the outbox table for people and scripts: status, dead messages, requeue, purge."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ._rows import KNOWN_STATUSES, MAX_PARTITION
from .dialects import dialect_for
from .dialects.base import blocking_rows
from .message import partition_for
from .schema import DUE_NOW, STATUS_DEAD, STATUS_PENDING, STATUS_PUBLISHED, OutboxTables, default_tables
from .writer import DEFAULT_PARTITIONS

__all__ = [
    "blocked_rows", "dead_filter", "get_dead", "list_dead", "outbox_status", "pending_behind", "purge_dead",
    "requeue_dead",
]

#: at most this many blocking messages are listed by :func:`blocked_rows` (the totals count all)
MAX_BLOCKERS_LISTED = 100


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _blocked_select(tables: OutboxTables, now: dt.datetime, ts: _Reader) -> sa.Select[Any]:
    """Per blocking row: (topic, key, id, rows held back behind it, of those due now, oldest created_at)."""
    o = tables.outbox
    b = blocking_rows(o, DUE_NOW).subquery("blocker")
    later = o.alias("later")
    return (
        sa.select(b.c.topic, b.c.key, b.c.id, sa.func.count(later.c.id),
                  sa.func.sum(sa.case((later.c.available_at <= now, 1), else_=0)),
                  ts(sa.func.min(later.c.created_at)))
        .join_from(b, later, sa.and_(later.c.topic == b.c.topic, later.c.key == b.c.key, later.c.id > b.c.id,
                                     later.c.status == STATUS_PENDING))
        .group_by(b.c.topic, b.c.key, b.c.id)
    )


def blocked_rows(engine: Engine, *, tables: OutboxTables | None = None) -> dict[str, Any]:
    """Pending rows held back by strict ordering, and what holds them back.

    Under ``ordering = "strict"`` (the default) a pending row waits while an earlier row (lower
    id) of the same (topic, key) is dead or waiting out a retry backoff. Returns ``blocked`` (rows
    held back), ``blocked_due`` (of those, rows otherwise due now) and ``blocked_by``: one entry per
    blocking row (``topic``, ``key``, ``blocking_id``, ``blocking_status`` ``dead`` or
    ``retrying``, ``reason``, ``attempts``, ``retry_at``, ``blocked`` rows behind it and
    ``waiting_since``, the write time of the oldest of them; also ``message_id`` and
    ``blocking_created_at`` of the blocking row), the most blocking first, at most
    :data:`MAX_BLOCKERS_LISTED`; and ``blocked_by_topic``: per topic, ``blocked`` rows, ``blockers``
    and the oldest ``waiting_since`` (all blockers counted, not only the listed ones).
    """
    t = tables or default_tables()
    o = t.outbox
    now = _now()
    ts = _reader(engine)
    with engine.connect() as conn:
        groups = conn.execute(_blocked_select(t, now, ts)).all()
        groups = sorted(groups, key=lambda g: (-int(g[3]), g[2]))
        listed = groups[:MAX_BLOCKERS_LISTED]
        details = {
            row.id: row
            for row in conn.execute(
                sa.select(o.c.id, o.c.message_id, o.c.status, o.c.last_error, o.c.attempts,
                          ts(o.c.available_at, "available_at"), ts(o.c.created_at, "created_at"))
                .where(o.c.id.in_([g[2] for g in listed]))
            )
        } if listed else {}
    blocked_by = []
    for topic, key, bid, n, _due, since in listed:
        d = details.get(bid)
        dead = d is not None and d.status == STATUS_DEAD
        blocked_by.append({
            "topic": topic, "key": key, "blocking_id": bid,
            "message_id": str(d.message_id) if d is not None else None,
            "blocking_status": "dead" if dead else "retrying",
            "blocking_created_at": _aware(d.created_at) if d is not None else None,
            "reason": d.last_error if d is not None else None,
            "attempts": d.attempts if d is not None else None,
            "retry_at": None if dead or d is None else _aware(d.available_at),
            "blocked": int(n), "waiting_since": _aware(since),
        })
    by_topic: dict[str, dict[str, Any]] = {}
    for topic, _key, _bid, n, _due, since in groups:
        entry = by_topic.setdefault(topic, {"blocked": 0, "blockers": 0, "waiting_since": None})
        entry["blocked"] += int(n)
        entry["blockers"] += 1
        since = _aware(since)
        if isinstance(since, dt.datetime) and (entry["waiting_since"] is None or since < entry["waiting_since"]):
            entry["waiting_since"] = since
    return {
        "blocked": sum(int(g[3]) for g in groups),
        "blocked_due": sum(int(g[4] or 0) for g in groups),
        "blocked_by": blocked_by,
        "blocked_by_topic": dict(sorted(by_topic.items())),
    }


def _aware(ts: dt.datetime | str | None) -> dt.datetime | str | None:
    """An aware UTC datetime; a value read through :func:`_reader` that no datetime holds
    (PostgreSQL's ``'infinity'``, year 10000, MariaDB's zero date) stays the text it was read as."""
    if isinstance(ts, str):
        try:
            ts = dt.datetime.fromisoformat(ts)
        except ValueError:
            return ts
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=dt.timezone.utc)
    return ts


_Reader = Callable[..., sa.ColumnElement[Any]]


def _reader(engine: Engine) -> _Reader:
    """``ts(column, label=None)``: a timestamp column read so that no stored value fails the driver
    (:meth:`~outbox.dialects.base.Dialect.readable_timestamp`); :func:`_aware` makes it a datetime."""
    readable = dialect_for(engine).readable_timestamp

    def ts(column: sa.ColumnElement[Any], label: str | None = None) -> sa.ColumnElement[Any]:
        expr = readable(column)
        return expr.label(label) if label is not None else expr

    return ts


#: tables the database estimates at this many rows or more are counted from the estimate (``count(*)``
#: reads them whole: about 0.5 s per million rows); smaller ones exactly
ESTIMATE_ABOVE = 100_000

#: per leaf partition of the archive: the planner's row estimate (-1: never analyzed), and its name
_ARCHIVE_LEAVES = sa.text(
    "SELECT c.reltuples, t.relid::regclass::text FROM pg_partition_tree(to_regclass(:archive)) t "
    "JOIN pg_class c ON c.oid = t.relid WHERE t.isleaf"
)
_PG_ROWS = sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:table)")
_MYSQL_ROWS = sa.text(
    "SELECT table_rows FROM information_schema.tables WHERE table_schema = coalesce(:schema, DATABASE()) "
    "AND table_name = :table"
)


def _archived(conn: sa.Connection, tables: OutboxTables, estimate_above: int | None) -> tuple[str, int, bool]:
    """The layout, the published rows the partitioned layout's trigger moved into the archive (0 on
    the plain layout), and whether that count is the planner's estimate (``pg_class.reltuples`` of
    the archive's partitions, when they add up to ``estimate_above`` rows or more) rather than exact."""
    if conn.dialect.name != "postgresql":
        return "plain", 0, False
    from .dialects.pg_partitions import PartitionNames, is_partitioned

    if not is_partitioned(conn, tables.names, cached=False):
        return "plain", 0, False
    n = PartitionNames.of(tables.names)
    if estimate_above is not None:
        leaves = conn.execute(_ARCHIVE_LEAVES, {"archive": n.q(n.archive)}).all()
        estimate = sum(max(0.0, float(rows)) for rows, _ in leaves)
        if estimate >= estimate_above:
            # a leaf never analyzed yet (today's, just created) is counted: it is small, or soon analyzed
            unknown = [name for rows, name in leaves if rows < 0]
            for name in unknown:  # names from pg_class, already quoted by ::regclass::text
                estimate += conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one()  # noqa: S608 - catalogue names
            return "partitioned", round(estimate), True
    count = conn.execute(sa.text(f"SELECT count(*) FROM {n.q(n.archive)}")).scalar_one()  # noqa: S608 - validated, quoted names
    return "partitioned", int(count), False


def _estimated_rows(conn: sa.Connection, table: sa.Table) -> int | None:
    """The database's estimate of ``table``'s rows (PostgreSQL's planner, MySQL/MariaDB's
    information_schema), ``None`` where there is none (SQLite, never analyzed)."""
    name = conn.dialect.name
    if name == "postgresql":
        quoted = conn.dialect.identifier_preparer.format_table(table)
        rows = conn.execute(_PG_ROWS, {"table": quoted}).scalar()
        return None if rows is None or rows < 0 else round(float(rows))
    if name in ("mysql", "mariadb"):
        rows = conn.execute(_MYSQL_ROWS, {"schema": table.schema, "table": table.name}).scalar()
        return None if rows is None else int(rows)
    return None


def outbox_status(
    engine: Engine, *, tables: OutboxTables | None = None, estimate_above: int | None = ESTIMATE_ABOVE
) -> dict[str, Any]:
    """Pending, due, blocked and dead counts, the oldest pending age, live relays and partition leases.

    ``due`` counts rows a relay would send now; rows held back by strict ordering behind a dead or
    retrying earlier row of their (topic, key) are counted in ``blocked`` instead, and
    ``blocked_by`` says what blocks them (see :func:`blocked_rows`). ``waiting`` counts pending rows
    not due yet (retry backoffs and delays; the next due at ``waiting_next_due_at``), ``delayed``
    those of them never tried (written with a delay). Each relay has ``alive``, ``lease_expired``
    and ``heartbeat_age_s``; ``relays_by_group`` counts them per group. ``layout`` is ``partitioned``
    after ``outbox db upgrade --layout partitioned`` (else ``plain``): published rows kept in audit mode
    are then in the archive table, counted in ``archived`` and in ``published``. The shape is documented
    in docs/operations.md ("status JSON").

    Published rows of a table the database estimates at ``estimate_above`` rows or more (``None``:
    never) are not counted one by one: ``archived`` is then the planner's estimate of the archive
    (``archived_estimate`` true), and on the plain layout, when that many are published, ``published``
    the table's estimated rows less the exact pending, dead and unknown ones (``published_estimate``
    true; also true when ``archived`` is an estimate, as ``published`` includes it).
    """
    t = tables or default_tables()
    o, le, r = t.outbox, t.leases, t.relays
    now = _now()
    blocked = blocked_rows(engine, tables=t)
    ts = _reader(engine)
    with engine.connect() as conn:
        pending, oldest = conn.execute(
            sa.select(sa.func.count(), ts(sa.func.min(o.c.created_at))).where(o.c.status == STATUS_PENDING)
        ).one()
        due = conn.execute(
            sa.select(sa.func.count()).where(o.c.status == STATUS_PENDING, o.c.available_at <= now)
        ).scalar_one()
        retrying = conn.execute(
            sa.select(sa.func.count()).where(o.c.status == STATUS_PENDING, o.c.attempts > 0)
        ).scalar_one()
        delayed, next_due = conn.execute(
            sa.select(sa.func.count(), ts(sa.func.min(o.c.available_at)))
            .where(o.c.status == STATUS_PENDING, o.c.available_at > now)
        ).one()
        scheduled, next_scheduled = conn.execute(
            sa.select(sa.func.count(), ts(sa.func.min(o.c.available_at)))
            .where(o.c.status == STATUS_PENDING, o.c.available_at > now, o.c.attempts == 0)
        ).one()
        dead = conn.execute(sa.select(sa.func.count()).where(o.c.status == STATUS_DEAD)).scalar_one()
        layout, archived, archived_estimate = _archived(conn, t, estimate_above)
        unknown = conn.execute(sa.select(sa.func.count()).where(o.c.status.not_in(KNOWN_STATUSES))).scalar_one()
        total = _estimated_rows(conn, o) if estimate_above is not None and layout == "plain" else None
        rest = None if total is None else total - pending - dead - unknown
        # estimated only where published rows make the table big (not a big backlog, whose estimate
        # would show a few thousand published rows that are not there)
        published_estimate = rest is not None and rest >= estimate_above  # type: ignore[operator]
        if published_estimate:  # the rest of a big audit table: published rows, never read one by one
            published = rest
        else:
            published = conn.execute(
                sa.select(sa.func.count()).where(o.c.status == STATUS_PUBLISHED)).scalar_one()
        relays = [dict(row._mapping) for row in conn.execute(sa.select(r).order_by(r.c.relay_id))]
        leases = [dict(row._mapping) for row in conn.execute(sa.select(le).order_by(le.c.relay_group, le.c.partition))]
    oldest = _aware(oldest)
    relays_by_group: dict[str, dict[str, Any]] = {}
    for rel in relays:
        rel["alive"] = rel["expires_at"] is not None and rel["expires_at"] > now
        rel["lease_expired"] = not rel["alive"]
        beat = _aware(rel.get("heartbeat_at"))
        rel["heartbeat_age_s"] = (now - beat).total_seconds() if beat is not None else None
        group = relays_by_group.setdefault(rel.get("relay_group") or "default", {"alive": 0, "expired": 0,
                                                                                  "last_heartbeat_at": None})
        group["alive" if rel["alive"] else "expired"] += 1
        if beat is not None and (group["last_heartbeat_at"] is None or beat > group["last_heartbeat_at"]):
            group["last_heartbeat_at"] = beat
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
        "due": max(0, due - blocked["blocked_due"]),
        "blocked": blocked["blocked"],
        "blocked_by": blocked["blocked_by"],
        "blocked_by_topic": blocked["blocked_by_topic"],
        "retrying": retrying,
        "waiting": delayed,
        "waiting_next_due_at": _aware(next_due),
        "delayed": scheduled,
        "delayed_next_due_at": _aware(next_scheduled),
        "dead": dead,
        "published": published + archived,
        "archived": archived,
        "archived_estimate": archived_estimate,
        "published_estimate": published_estimate or archived_estimate,
        "layout": layout,
        "unknown_status": unknown,
        "oldest_pending_at": oldest,
        "oldest_pending_age_s": (now - oldest).total_seconds() if isinstance(oldest, dt.datetime) else None,
        "relays": relays,
        "relays_by_group": dict(sorted(relays_by_group.items())),
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
    cols = [o.c.id, o.c.message_id, o.c.topic, o.c.key, o.c.attempts, _reader(engine)(o.c.created_at, "created_at"),
            o.c.last_error]
    q = sa.select(*cols).where(*dead_filter(t, topic=topic, key=key, older_than=older_than)).order_by(o.c.id)
    with engine.connect() as conn:
        return [{**r._mapping, "created_at": _aware(r.created_at)} for r in conn.execute(q.limit(limit))]


def get_dead(engine: Engine, row_id: int, *, tables: OutboxTables | None = None) -> dict[str, Any] | None:
    t = tables or default_tables()
    ts, times = _reader(engine), ("created_at", "available_at")
    cols = [ts(c, c.name) if c.name in times else c for c in t.outbox.c]
    with engine.connect() as conn:
        row = conn.execute(sa.select(*cols).where(t.outbox.c.id == row_id)).first()
    return {**row._mapping, **{n: _aware(row._mapping[n]) for n in times}} if row is not None else None


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
    key: str | None = None, older_than: dt.timedelta | None = None, with_blocked: bool = False,
) -> int:
    """Delete dead rows for good. Returns how many rows were deleted.

    With ``with_blocked``, also delete the pending rows held back behind them: for every (topic,
    key) of a purged dead row, the pending rows of that (topic, key) with a higher id than its
    earliest purged dead row. That drops a poison key's whole stuck stream in one operation;
    without it, those later rows are sent once nothing earlier blocks them (and, if they are
    poison too, each becomes dead in turn).
    """
    t = tables or default_tables()
    o = t.outbox
    where = dead_filter(t, ids=ids, topic=topic, key=key, older_than=older_than)
    with engine.begin() as conn:
        groups = conn.execute(
            sa.select(o.c.topic, o.c.key, sa.func.min(o.c.id)).where(*where, o.c.key.is_not(None))
            .group_by(o.c.topic, o.c.key)
        ).all() if with_blocked else []
        n = int(conn.execute(o.delete().where(*where)).rowcount)
        for g_topic, g_key, first in groups:
            n += int(conn.execute(o.delete().where(
                o.c.status == STATUS_PENDING, o.c.topic == g_topic, o.c.key == g_key, o.c.id > first)).rowcount)
        return n


def pending_behind(
    engine: Engine, *, tables: OutboxTables | None = None, ids: list[int] | None = None, topic: str | None = None,
    key: str | None = None, older_than: dt.timedelta | None = None,
) -> int:
    """Pending rows of the same (topic, key) after the dead rows the filter selects (what they hold back)."""
    t = tables or default_tables()
    o = t.outbox
    dead = (
        sa.select(o.c.topic, o.c.key, sa.func.min(o.c.id).label("first"))
        .where(*dead_filter(t, ids=ids, topic=topic, key=key, older_than=older_than), o.c.key.is_not(None))
        .group_by(o.c.topic, o.c.key).subquery("dead")
    )
    later = o.alias("later")
    q = sa.select(sa.func.count()).select_from(later).join(
        dead, sa.and_(later.c.topic == dead.c.topic, later.c.key == dead.c.key, later.c.id > dead.c.first)
    ).where(later.c.status == STATUS_PENDING)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())
