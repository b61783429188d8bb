"""Retention: purge published outbox rows (audit mode) and keep the partitioned layout's partitions ahead.

On PostgreSQL with the partitioned layout (``outbox db upgrade --layout partitioned``) old rows leave
by dropping whole day partitions: no DELETE, no dead tuples, the space returned at once. Elsewhere
(the plain layout, MySQL/MariaDB, SQLite) rows are deleted in short transactions, each a range of
the primary key. See docs/retention.md.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from .errors import ConfigurationError
from .schema import STATUS_PUBLISHED, OutboxTables, default_tables

__all__ = ["check_batch_size", "maintain_partitions", "purge_published"]


def check_batch_size(batch_size: object) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= 100_000:
        raise ConfigurationError(f"batch_size must be an int between 1 and 100000, got {batch_size!r}")
    return batch_size


def _partitioned(engine: sa.Engine, tables: OutboxTables) -> bool:
    if engine.dialect.name != "postgresql":
        return False
    from .dialects.pg_partitions import is_partitioned

    with engine.connect() as conn:
        return is_partitioned(conn, tables.names, cached=False)


def maintain_partitions(engine: sa.Engine, *, tables: OutboxTables | None = None, ahead: int = 3,
                        now: dt.datetime | None = None) -> dict[str, Any]:
    """Partitioned layout: create today's and the next ``ahead`` days' partitions, move the dedup bucket
    to today. ``{"layout": "plain"}`` and nothing done on any other layout or database."""
    t = tables or default_tables()
    if engine.dialect.name != "postgresql":
        return {"layout": "plain"}
    from .dialects.pg_partitions import maintain

    return maintain(engine, t, ahead=ahead, now=now)


def purge_published(
    engine: sa.Engine, *, older_than: dt.timedelta, batch_size: int = 5000, tables: OutboxTables | None = None
) -> int:
    """Remove published outbox rows (audit mode) published longer than ``older_than`` ago; return how many.

    Partitioned layout: drop every archive day partition older than the cutoff, then delete the
    old rows of the default partition (days nobody created ahead) in batches. Plain layout: delete
    in batches, each one short transaction over a range of ids.
    """
    if not isinstance(older_than, dt.timedelta) or older_than <= dt.timedelta(0):
        raise ConfigurationError(f"older_than must be a positive timedelta, got {older_than!r}")
    check_batch_size(batch_size)
    t = tables or default_tables()
    cutoff = dt.datetime.now(dt.timezone.utc) - older_than
    if _partitioned(engine, t):
        from .dialects.pg_partitions import PartitionNames, drop_expired, maintain

        maintain(engine, t, checked=True)
        total = int(drop_expired(engine, t, "published", cutoff)["rows"])
        default = sa.Table(PartitionNames.of(t.names).archive_default, sa.MetaData(),
                           *(c._copy() for c in t.outbox.columns), schema=t.names.schema)
        return total + delete_by_id_range(engine, default, [default.c.published_at < cutoff], batch_size)
    return delete_by_id_range(engine, t.outbox, [t.outbox.c.status == STATUS_PUBLISHED,
                                                 t.outbox.c.published_at < cutoff], batch_size)


def delete_by_id_range(engine: sa.Engine, table: sa.Table, conds: list[Any], batch_size: int) -> int:
    """Delete the rows matching ``conds``, in short transactions, each over one range of ``id``.

    Each batch reads the ``batch_size``-th matching id after the previous batch and deletes
    ``prev < id <= that``: one index range on the primary key (InnoDB locks that range, not a
    scattered list; SQLite and PostgreSQL walk it in order).
    """
    total = 0
    after = 0
    while True:
        with engine.begin() as conn:
            ids = sa.select(table.c.id).where(table.c.id > after, *conds).order_by(table.c.id).limit(batch_size)
            upper = conn.execute(sa.select(sa.func.max(ids.subquery().c.id))).scalar()
            if upper is None:
                return total
            total += int(conn.execute(table.delete().where(table.c.id > after, table.c.id <= upper, *conds)).rowcount)
        after = int(upper)
