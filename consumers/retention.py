"""Retention of the processed-messages table: delete old ids in short batches.

The retention window must be longer than the longest time a broker can take to redeliver a
message (Kafka: the topic's retention plus how far a consumer group can lag or be rewound;
RabbitMQ: how long a message can sit unacked or in a retry/dead-letter loop). An id purged
before its last redelivery makes that redelivery look new.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from outbox.errors import ConfigurationError
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
    """Delete processed-message rows older than ``older_than``; return how many.

    Each batch is its own short transaction: select up to ``batch_size`` keys, delete those keys.
    """
    if not isinstance(older_than, dt.timedelta) or older_than <= dt.timedelta(0):
        raise ConfigurationError(f"older_than must be a positive timedelta, got {older_than!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= 100_000:
        raise ConfigurationError(f"batch_size must be an int between 1 and 100000, got {batch_size!r}")
    t = (tables or default_tables()).processed
    cutoff = dt.datetime.now(dt.timezone.utc) - older_than
    conds = [t.c.processed_at < cutoff]
    if consumer is not None:
        conds.append(t.c.consumer == consumer)
    total = 0
    batches = 0
    while max_batches is None or batches < max_batches:
        with engine.begin() as conn:
            keys = conn.execute(sa.select(t.c.consumer, t.c.message_id).where(*conds).limit(batch_size)).all()
            if not keys:
                break
            by_consumer: dict[str, list[str]] = {}
            for c, m in keys:
                by_consumer.setdefault(c, []).append(m)
            for c, ids in by_consumer.items():
                total += int(
                    conn.execute(t.delete().where(t.c.consumer == c, t.c.message_id.in_(ids), *conds)).rowcount
                )
        batches += 1
        if len(keys) < batch_size:
            break
    return total
