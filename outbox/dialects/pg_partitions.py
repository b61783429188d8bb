"""PostgreSQL's partitioned retention layout: old rows leave by ``DROP`` of a whole partition, not ``DELETE``.

Opt-in, chosen when migrating (``outbox db upgrade --layout partitioned``); see docs/retention.md.

* **Audit-mode outbox rows.** Unpublished rows stay in the outbox table as they are (the claim
  index, per-key order and fencing are untouched). A statement-level trigger on the outbox table
  moves the rows an ``UPDATE`` marks ``published`` into ``<outbox>_archive`` in the same
  statement, so in the relay's own mark transaction: a row is either pending in the outbox table
  or published in the archive, never both, never neither. The archive is ``PARTITION BY RANGE
  (published_at)``, one partition per UTC day plus a default partition (a day nobody created
  ahead still has somewhere to go).
* **Processed-message (dedup) rows.** ``PARTITION BY RANGE (bucket)``, one partition per UTC day.
  A unique index on a partitioned table must include the partition key, so the primary key
  ``(consumer, message_id, bucket)`` only catches a duplicate inside one partition. Dedup across
  partitions holds because (1) every insert goes into the *current* bucket, read from the one-row
  table ``<processed>_bucket``, and checks the other partitions with ``NOT EXISTS``; (2) each dedup
  transaction holds a *shared* transaction-level advisory lock, taken in its own statement before
  the insert, and moving the current bucket forward takes the *exclusive* lock. So the move waits
  for every transaction still writing into the old bucket to end, and a transaction that writes
  into the new bucket starts its ``NOT EXISTS`` statement (READ COMMITTED: a new snapshot) after
  the move committed, so after every old-bucket writer committed: it sees their rows. Two
  writers of one bucket meet in its unique index (``ON CONFLICT DO NOTHING`` waits for the other's
  outcome). A duplicate is filtered before any tuple is written: no dead tuples.

Partitions are created ahead (:func:`maintain`: the relay at start and hourly, ``outbox purge``,
``outbox db partitions``) and dropped whole by :func:`drop_expired`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection, Engine

from ..schema import STATUS_PUBLISHED, OutboxTables, TableNames

__all__ = [
    "AHEAD_DAYS",
    "LAYOUTS",
    "PartitionNames",
    "create_layout",
    "drop_expired",
    "drop_layout",
    "forget_layout",
    "insert_processed",
    "is_partitioned",
    "maintain",
]

LAYOUTS = ("plain", "partitioned")
#: days of partitions kept created ahead of today
AHEAD_DAYS = 3
#: first key of the advisory locks (``'ob'``); the second is a hash of the processed table's name
_LOCK_CLASS = 0x6F62
#: a partition's name: its parent's name, ``_p``, its UTC day
_DAY = re.compile(r"_p(\d{8})$")
_LOCK_TIMEOUT_MS = 5000


def _derived(base: str, suffix: str) -> str:
    """``base + suffix``, shortened with a digest of ``base`` past PostgreSQL's 63-character limit."""
    name = base + suffix
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    return f"{base[: 63 - len(suffix) - 9]}_{digest}{suffix}"


@dataclass(frozen=True)
class PartitionNames:
    """Names of the partitioned layout's tables and partitions, derived from validated table names."""

    outbox: str
    processed: str
    schema: str | None

    @classmethod
    def of(cls, names: TableNames) -> PartitionNames:
        return cls(names.outbox, names.processed, names.schema)

    @property
    def archive(self) -> str:
        return _derived(self.outbox, "_archive")

    @property
    def archive_default(self) -> str:
        return _derived(self.outbox, "_archive_default")

    @property
    def bucket(self) -> str:
        return _derived(self.processed, "_bucket")

    @property
    def move_function(self) -> str:
        return _derived(self.outbox, "_to_archive")

    def partition(self, parent: str, day: dt.date) -> str:
        return _derived(parent, f"_p{day:%Y%m%d}")

    def q(self, name: str) -> str:
        """``name`` (schema-qualified) quoted for SQL text."""
        prep = pg.dialect().identifier_preparer
        return f"{prep.quote_identifier(self.schema)}.{prep.quote_identifier(name)}" if self.schema else \
            prep.quote_identifier(name)

    def lock_name(self) -> str:
        return f"{self.schema or ''}.{self.processed}"


def _today(now: dt.datetime | None = None) -> dt.date:
    return (now or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).date()


# ------------------------------------------------------------------ layout (the migration)
def _partitioned_tables(tables: OutboxTables) -> tuple[sa.Table, sa.Table]:
    """The partitioned processed table and the archive, on a metadata of their own, built from the plain ones."""
    n = PartitionNames.of(tables.names)
    md = sa.MetaData()
    proc_cols = [c._copy() for c in tables.processed.columns]
    for c in proc_cols:
        c.primary_key = False
    processed = sa.Table(
        n.processed, md, *proc_cols, sa.Column("bucket", sa.Date(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id", "bucket", name=f"pk_{n.processed}"[:63]),
        schema=n.schema, postgresql_partition_by="RANGE (bucket)",
    )
    sa.Index(f"ix_{n.processed}_processed_at", processed.c.processed_at)
    cols = []
    for c in tables.outbox.columns:
        copy = c._copy()
        copy.primary_key = False
        copy.autoincrement = False
        if c.name == "published_at":
            copy.nullable = False
        cols.append(copy)
    archive = sa.Table(
        n.archive, md, *cols, sa.PrimaryKeyConstraint("id", "published_at", name=f"pk_{n.archive}"[:63]),
        schema=n.schema, postgresql_partition_by="RANGE (published_at)",
    )
    sa.Index(_derived(n.archive, "_message_id"), archive.c.message_id)
    return processed, archive


def _ddl(conn: Connection, sql: str) -> None:
    # validated, quoted identifiers and dates only; ':' escaped for text()
    conn.execute(sa.text(sql.replace(":", "\\:")))


def create_layout(conn: Connection, tables: OutboxTables, *, now: dt.datetime | None = None) -> None:
    """Turn the plain layout into the partitioned one, keeping every row (run by migration 0005)."""
    n = PartitionNames.of(tables.names)
    processed, archive = _partitioned_tables(tables)
    old = _derived(n.processed, "_plain")
    _ddl(conn, f"ALTER TABLE {n.q(n.processed)} RENAME TO {pg.dialect().identifier_preparer.quote(old)}")
    _ddl(conn, f"ALTER INDEX {n.q(f'ix_{n.processed}_processed_at')} RENAME TO "
               f"{pg.dialect().identifier_preparer.quote(_derived(old, '_at'))}")
    processed.create(conn)
    archive.create(conn)
    _ddl(conn, f"CREATE TABLE {n.q(n.bucket)} (one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), "
               "bucket DATE NOT NULL)")
    today = _today(now)
    conn.execute(sa.text(f"INSERT INTO {n.q(n.bucket)} (bucket) VALUES (:d)"), {"d": today})  # noqa: S608 - validated, quoted names
    _ddl(conn, f"CREATE TABLE {n.q(n.archive_default)} PARTITION OF {n.q(n.archive)} DEFAULT")
    _create_ahead(conn, n, today, AHEAD_DAYS)
    plain_cols = ", ".join(f'"{c.name}"' for c in tables.processed.columns)
    conn.execute(sa.text(f"INSERT INTO {n.q(n.processed)} ({plain_cols}, bucket) SELECT {plain_cols}, :d "  # noqa: S608 - validated, quoted names
                         f"FROM {n.q(old)}"), {"d": today})
    _ddl(conn, f"DROP TABLE {n.q(old)}")
    out_cols = ", ".join(f'"{c.name}"' for c in tables.outbox.columns)
    published = f"'{STATUS_PUBLISHED}'"
    conn.execute(sa.text(f"INSERT INTO {n.q(n.archive)} ({out_cols}) SELECT {out_cols} FROM {n.q(n.outbox)} "  # noqa: S608 - validated, quoted names
                         f"WHERE status = {published} AND published_at IS NOT NULL"))
    conn.execute(sa.text(f"DELETE FROM {n.q(n.outbox)} WHERE status = {published} AND published_at IS NOT NULL"))  # noqa: S608 - validated, quoted names
    moved = ", ".join(f'm."{c.name}"' for c in tables.outbox.columns)
    body = (
        f"INSERT INTO {n.q(n.archive)} ({out_cols}) SELECT {moved} FROM moved m WHERE m.status = {published}; "  # noqa: S608 - validated, quoted names
        f"IF FOUND THEN DELETE FROM {n.q(n.outbox)} o USING moved m WHERE o.id = m.id AND m.status = {published}; "
        "END IF; RETURN NULL;"
    )
    _ddl(conn, f"CREATE FUNCTION {n.q(n.move_function)}() RETURNS trigger LANGUAGE plpgsql AS "
               f"$body$ BEGIN {body} END $body$")
    _ddl(conn, f"CREATE TRIGGER {pg.dialect().identifier_preparer.quote(n.move_function)} AFTER UPDATE ON "
               f"{n.q(n.outbox)} REFERENCING NEW TABLE AS moved FOR EACH STATEMENT "
               f"EXECUTE FUNCTION {n.q(n.move_function)}()")
    forget_layout(conn.engine)


def drop_layout(conn: Connection, tables: OutboxTables) -> None:
    """Back to the plain layout, keeping every row (the downgrade of 0005). A no-op on the plain layout."""
    if not is_partitioned(conn, tables.names, cached=False):
        return
    n = PartitionNames.of(tables.names)
    prep = pg.dialect().identifier_preparer
    _ddl(conn, f"DROP TRIGGER IF EXISTS {prep.quote(n.move_function)} ON {n.q(n.outbox)}")
    _ddl(conn, f"DROP FUNCTION IF EXISTS {n.q(n.move_function)}()")
    out_cols = ", ".join(f'"{c.name}"' for c in tables.outbox.columns)
    conn.execute(sa.text(f"INSERT INTO {n.q(n.outbox)} ({out_cols}) SELECT {out_cols} FROM {n.q(n.archive)} "  # noqa: S608 - validated, quoted names
                         "ORDER BY id"))
    _ddl(conn, f"DROP TABLE {n.q(n.archive)}")
    part = _derived(n.processed, "_parted")
    _ddl(conn, f"ALTER TABLE {n.q(n.processed)} RENAME TO {prep.quote(part)}")
    _ddl(conn, f"ALTER INDEX {n.q(f'ix_{n.processed}_processed_at')} RENAME TO {prep.quote(_derived(part, '_at'))}")
    _ddl(conn, f"ALTER TABLE {n.q(part)} RENAME CONSTRAINT {prep.quote(f'pk_{n.processed}'[:63])} TO "
               f"{prep.quote(_derived(part, '_pk'))}")
    plain = tables.processed.to_metadata(sa.MetaData())
    plain.create(conn)
    cols = ", ".join(f'"{c.name}"' for c in tables.processed.columns)
    # one row per (consumer, message_id): the newest, should an id sit in two buckets (it cannot, but be sure)
    conn.execute(sa.text(f"INSERT INTO {n.q(n.processed)} ({cols}) SELECT DISTINCT ON (consumer, message_id) {cols} "  # noqa: S608 - validated, quoted names
                         f"FROM {n.q(part)} ORDER BY consumer, message_id, processed_at DESC"))
    _ddl(conn, f"DROP TABLE {n.q(part)}")
    _ddl(conn, f"DROP TABLE {n.q(n.bucket)}")
    forget_layout(conn.engine)


# ------------------------------------------------------------------ which layout
_LAYOUT_CACHE: weakref.WeakKeyDictionary[Engine, dict[tuple[str | None, str], bool]] = weakref.WeakKeyDictionary()


def is_partitioned(conn: Connection, names: TableNames | tuple[str | None, str], *, cached: bool = True) -> bool:
    """Whether the processed table ``names`` (or ``(schema, processed)``) is the partitioned layout's."""
    key = (names.schema, names.processed) if isinstance(names, TableNames) else names
    per_engine = _LAYOUT_CACHE.setdefault(conn.engine, {})
    if cached and key in per_engine:
        return per_engine[key]
    qualified = PartitionNames(outbox="", processed=key[1], schema=key[0]).q(key[1])
    kind = conn.execute(sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": qualified}).scalar()
    per_engine[key] = kind == "p"
    return per_engine[key]


def forget_layout(engine: Engine) -> None:
    """Drop what :func:`is_partitioned` remembers of ``engine`` (after a migration switched layouts)."""
    _LAYOUT_CACHE.pop(engine, None)


# ------------------------------------------------------------------ dedup insert
def insert_processed(
    connection: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], key_column: str
) -> set[Any]:
    """Insert-if-absent into the partitioned processed table; the inserted ``key_column`` values.

    Statement 1 takes the shared lock (see the module docstring); statement 2 inserts, in one
    ``INSERT ... SELECT unnest(:ids) ... WHERE NOT EXISTS (other buckets) ON CONFLICT DO NOTHING``
    per group of rows sharing their other values.
    """
    n = PartitionNames(outbox="", processed=table.name, schema=table.schema)
    connection.execute(sa.text("SELECT pg_advisory_xact_lock_shared(:c, hashtext(:n))"),
                       {"c": _LOCK_CLASS, "n": n.lock_name()})
    others = [c for c in rows[0] if c != key_column]
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:
        groups.setdefault(tuple(_hashable(r[c]) for c in others), []).append(r)
    cols = ", ".join(f'"{c}"' for c in [key_column, *others])
    params_sql = ", ".join(f":v_{i}" for i in range(len(others)))
    match = " AND ".join(f'p."{c}" = :v_{i}' for i, c in enumerate(others) if table.c[c].primary_key)
    sql = (
        f"INSERT INTO {n.q(n.processed)} ({cols}, bucket) "  # noqa: S608 - validated, quoted names
        f"SELECT k.id{', ' + params_sql if others else ''}, b.bucket FROM unnest(:ids) AS k(id) "
        f"CROSS JOIN {n.q(n.bucket)} AS b WHERE NOT EXISTS (SELECT 1 FROM {n.q(n.processed)} AS p "
        f'WHERE p."{key_column}" = k.id{" AND " + match if match else ""} AND p.bucket <> b.bucket) '
        f'ON CONFLICT DO NOTHING RETURNING "{key_column}"'
    )
    stmt = sa.text(sql).bindparams(
        # no collation in the cast (see PostgreSQLDialect.rows_by_keys): the column's own applies
        sa.bindparam("ids", type_=pg.ARRAY(sa.String())),
        *(sa.bindparam(f"v_{i}", type_=table.c[c].type) for i, c in enumerate(others)),
    )
    inserted: set[Any] = set()
    for members in groups.values():
        first = members[0]
        params: dict[str, Any] = {"ids": [r[key_column] for r in members]}
        params.update({f"v_{i}": first[c] for i, c in enumerate(others)})
        inserted.update(connection.execute(stmt, params).scalars())
    return inserted


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, (dict, list)) else value


# ------------------------------------------------------------------ upkeep
def _day_of(name: str) -> dt.date | None:
    m = _DAY.search(name)
    return dt.datetime.strptime(m.group(1), "%Y%m%d").date() if m else None


def _children(conn: Connection, n: PartitionNames, *parents: str) -> dict[str, dict[str, dt.date | None]]:
    """The partitions of each of ``parents`` (one catalog read): parent -> {name: the UTC day it holds}
    (None: not one of ours, e.g. the default)."""
    qualified = {n.q(p): p for p in parents}
    out: dict[str, dict[str, dt.date | None]] = {p: {} for p in parents}
    rows = conn.execute(sa.text(
        "SELECT q.name, c.relname FROM unnest(CAST(:ps AS text[])) AS q(name) JOIN pg_inherits i "
        "ON i.inhparent = to_regclass(q.name) JOIN pg_class c ON c.oid = i.inhrelid"), {"ps": list(qualified)})
    for parent, name in rows:
        out[qualified[parent]][name] = _day_of(name)
    return out


def _create_ahead(conn: Connection, n: PartitionNames, today: dt.date, ahead: int,
                  children: Mapping[str, Mapping[str, dt.date | None]] | None = None) -> list[str]:
    """Create the missing partitions of ``today`` and ``ahead`` days on; ``children``: what
    :func:`_children` just read of both parents (read here if not given)."""
    if children is None:
        children = _children(conn, n, n.archive, n.processed)
    created = []
    for parent in (n.archive, n.processed):
        have = {d for d in children[parent].values() if d is not None}
        for i in range(ahead + 1):
            day = today + dt.timedelta(days=i)
            if day in have:
                continue
            lo, hi = (f"'{day.isoformat()}'", f"'{(day + dt.timedelta(days=1)).isoformat()}'")
            if parent == n.archive:  # timestamptz bounds at UTC midnight
                lo, hi = f"'{day.isoformat()} 00:00:00+00'", f"'{(day + dt.timedelta(days=1)).isoformat()} 00:00:00+00'"
                if conn.execute(sa.text(f"SELECT 1 FROM {n.q(n.archive_default)} WHERE published_at >= CAST(:lo AS "  # noqa: S608 - validated, quoted names
                                        "timestamptz) AND published_at < CAST(:hi AS timestamptz) LIMIT 1"),
                                {"lo": lo.strip("'"), "hi": hi.strip("'")}).first():
                    continue  # that day's rows already went to the default partition: leave them there
            name = n.partition(parent, day)
            _ddl(conn, f"CREATE TABLE IF NOT EXISTS {n.q(name)} PARTITION OF {n.q(parent)} "
                       f"FOR VALUES FROM ({lo}) TO ({hi})")
            created.append(name)
    return created


def maintain(bind: Engine | Connection, tables: OutboxTables, *, ahead: int = AHEAD_DAYS,
             now: dt.datetime | None = None, checked: bool = False) -> dict[str, Any]:
    """Create the partitions of today and ``ahead`` days on, and move the dedup bucket to today.

    Cheap when nothing is missing (two reads: the partitions of both tables, the current bucket).
    Each change is its own short transaction with a lock timeout: if a long transaction holds the
    table, the step is skipped (``"skipped"``) and the next call does it. A no-op (``{"layout":
    "plain"}``) on the plain layout; ``checked``: the caller has just read that the layout is the
    partitioned one.
    """
    if isinstance(bind, Connection):
        return _maintain(bind.engine, tables, ahead, now, checked)
    return _maintain(bind, tables, ahead, now, checked)


def _maintain(engine: Engine, tables: OutboxTables, ahead: int, now: dt.datetime | None,
              checked: bool) -> dict[str, Any]:
    n = PartitionNames.of(tables.names)
    today = _today(now)
    out: dict[str, Any] = {"layout": "partitioned", "created": [], "skipped": []}
    with engine.connect() as conn:
        if not checked and not is_partitioned(conn, tables.names, cached=False):
            return {"layout": "plain"}
        children = _children(conn, n, n.archive, n.processed)
        current = conn.execute(sa.text(f"SELECT bucket FROM {n.q(n.bucket)}")).scalar_one()  # noqa: S608 - validated, quoted names
        conn.commit()
        days = [today + dt.timedelta(days=i) for i in range(ahead + 1)]
        have = {p: set(c.values()) for p, c in children.items()}
        if any(d not in have[p] for p in have for d in days):
            try:
                with conn.begin():
                    _ddl(conn, f"SET LOCAL lock_timeout = {_LOCK_TIMEOUT_MS}")
                    out["created"] = _create_ahead(conn, n, today, ahead, children)
                have[n.processed] |= {_day_of(name) for name in out["created"]}
            except sa.exc.OperationalError:  # lock timeout: a long transaction holds the table; next time
                out["skipped"].append("create")
        if current < today and today in have[n.processed]:
            try:
                with conn.begin():
                    _ddl(conn, f"SET LOCAL lock_timeout = {_LOCK_TIMEOUT_MS}")
                    # exclusive: waits for every dedup transaction still writing into the old bucket
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:c, hashtext(:n))"),
                                 {"c": _LOCK_CLASS, "n": n.lock_name()})
                    conn.execute(sa.text(f"UPDATE {n.q(n.bucket)} SET bucket = :d WHERE bucket < :d"), {"d": today})  # noqa: S608 - validated, quoted names
                current = today
            except sa.exc.OperationalError:
                out["skipped"].append("bucket")
    out["bucket"] = current.isoformat()
    return out


def _row_count(conn: Connection, qualified: str) -> int:
    """Rows of a partition about to be dropped: the statistics' count (``pg_class.reltuples``, as the
    last (auto)vacuum or analyze left it) once it has one, so a purge never reads a whole partition just to
    count it (0.5 s per million rows); ``count(*)`` for a partition never vacuumed nor analysed."""
    estimate = conn.execute(sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"),
                            {"t": qualified}).scalar()
    if estimate is not None and estimate >= 0:
        return int(estimate)
    return int(conn.execute(sa.text(f"SELECT count(*) FROM {qualified}")).scalar_one())  # noqa: S608 - validated, quoted names


def _doomed(parent: str, day: dt.date) -> str:
    """The name a partition of ``parent`` takes when it is detached to be dropped (see :func:`drop_expired`)."""
    return _derived(parent, f"_d{day:%Y%m%d}")


def _left_doomed(conn: Connection, n: PartitionNames, parent: str) -> list[str]:
    """Tables a purge detached and renamed for dropping but did not drop (it stopped in between)."""
    prefix = _derived(parent, "_d00000000")[:-8]  # what _doomed puts before the day
    return list(conn.execute(sa.text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace "
        "WHERE s.nspname = COALESCE(CAST(:schema AS text), current_schema()) AND c.relkind = 'r' "
        "AND NOT c.relispartition AND left(c.relname, :len) = :prefix AND substr(c.relname, :len + 1) ~ '^[0-9]{8}$'"),
        {"schema": n.schema, "len": len(prefix), "prefix": prefix}).scalars())


def drop_expired(engine: Engine, tables: OutboxTables, what: str, cutoff: dt.datetime) -> dict[str, Any]:
    """Drop the partitions of ``what`` (``"published"`` or ``"processed"``) whose every row is older than ``cutoff``.

    Never a live partition: an archive day whose end is after the cutoff stays; a dedup bucket stays
    while it is the current one or holds a row processed at or after the cutoff. Returns the dropped
    partitions and how many rows they held (see :func:`_row_count`).

    Each partition goes in two short transactions. The first detaches it and renames it (to
    ``<parent>_dYYYYMMDD``): it holds the parent's lock for a catalog change only. The second drops
    it, and the files are unlinked at that commit (file-system work: a tenth of a second per 400 MB
    here, seconds on a busy disk) with the parent free, so dedup inserts and the relay's archive
    trigger do not wait for it. A table left renamed by a purge that stopped in between is dropped
    by the next one.
    """
    n = PartitionNames.of(tables.names)
    parent = n.archive if what == "published" else n.processed
    dropped: list[str] = []
    rows = 0
    with engine.connect() as conn:
        children = _children(conn, n, parent)[parent]
        current = dt.date.max  # published: not read, not used
        if what == "processed":
            current = conn.execute(sa.text(f"SELECT bucket FROM {n.q(n.bucket)}")).scalar_one()  # noqa: S608 - validated, quoted names
        doomed = _left_doomed(conn, n, parent)
        conn.commit()
        for name, day in sorted(children.items(), key=lambda kv: (kv[1] or dt.date.max)):
            if day is None:
                continue
            end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
            if (end > cutoff) if what == "published" else (day >= current):
                continue
            with conn.begin():
                if what == "processed":
                    newest = conn.execute(sa.text(f"SELECT max(processed_at) FROM {n.q(name)}")).scalar()  # noqa: S608 - validated, quoted names
                    if newest is not None and newest >= cutoff:
                        continue
                _ddl(conn, f"SET LOCAL lock_timeout = {_LOCK_TIMEOUT_MS}")
                count = _row_count(conn, n.q(name))
                _ddl(conn, f"ALTER TABLE {n.q(parent)} DETACH PARTITION {n.q(name)}")
                to = pg.dialect().identifier_preparer.quote(_doomed(parent, day))
                _ddl(conn, f"ALTER TABLE {n.q(name)} RENAME TO {to}")
            rows += count
            dropped.append(name)
            doomed.append(_doomed(parent, day))
        for name in doomed:
            with conn.begin():
                _ddl(conn, f"DROP TABLE IF EXISTS {n.q(name)}")
    return {"dropped": dropped, "rows": rows}
