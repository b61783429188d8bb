"""Retention of the processed-messages table: drop old day partitions, or delete old ids in short batches.

The retention window must be longer than the longest time a broker can take to redeliver a
message (Kafka: the topic's retention plus how far a consumer group can lag or be rewound;
RabbitMQ: how long a message can sit unacked or in a retry/dead-letter loop). An id purged
before its last redelivery makes that redelivery look new.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from outbox.errors import ConfigurationError
from outbox.retention import check_batch_size
from outbox.schema import OutboxTables, default_tables

__all__ = ["purge_processed"]


def purge_processed(
    engine: sa.Engine,
    *,
    older_than: dt.timedelta,
    consumer: str | None = None,
    batch_size: int = 5000,
    tables: OutboxTables | None = None,
    max_batches: int | None = None,
) -> int:
    """Remove processed-message rows older than ``older_than``; return how many.

    Partitioned layout (PostgreSQL, all consumers): drop every day partition whose rows are all older
    than the cutoff (never the current one); rows of a partition that still holds a newer row stay
    until that partition goes, so an id is kept at least ``older_than``, at most a day longer.
    Otherwise, and for one ``consumer``: per consumer, short transactions each deleting one range
    of ``message_id`` (a primary-key range).
    """
    if not isinstance(older_than, dt.timedelta) or older_than <= dt.timedelta(0):
        raise ConfigurationError(f"older_than must be a positive timedelta, got {older_than!r}")
    check_batch_size(batch_size)
    t = tables or default_tables()
    cutoff = dt.datetime.now(dt.timezone.utc) - older_than
    if consumer is None and engine.dialect.name == "postgresql":
        from outbox.dialects.pg_partitions import drop_expired, is_partitioned, maintain

        with engine.connect() as conn:
            partitioned = is_partitioned(conn, t.names, cached=False)
        if partitioned:
            maintain(engine, t, checked=True)
            return int(drop_expired(engine, t, "processed", cutoff)["rows"])
    p = t.processed
    with engine.connect() as conn:
        consumers = [consumer] if consumer is not None else list(
            conn.execute(sa.select(p.c.consumer).distinct()).scalars())
    total = 0
    batches = 0
    for c in consumers:
        after: str | None = None
        while max_batches is None or batches < max_batches:
            conds = [p.c.consumer == c, p.c.processed_at < cutoff]
            if after is not None:
                conds.append(p.c.message_id > after)
            with engine.begin() as conn:
                ids = sa.select(p.c.message_id).where(*conds).order_by(p.c.message_id).limit(batch_size).subquery()
                upper = conn.execute(sa.select(sa.func.max(ids.c.message_id))).scalar()
                if upper is None:
                    break
                total += int(conn.execute(p.delete().where(*conds, p.c.message_id <= upper)).rowcount)
            batches += 1
            after = upper
    return total
