"""Retention of processed ids (library function and `outbox purge`) and the PostgreSQL dead-tuple check."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from consumers import IncomingMessage, Status, purge_processed
from outbox.cli import main
from outbox.schema import default_tables

T = default_tables()


def _processed(engine, n: int, age: dt.timedelta, consumer: str = "test.old") -> None:
    at = dt.datetime.now(dt.timezone.utc) - age
    with engine.begin() as c:
        c.execute(T.processed.insert(), [{"consumer": consumer, "message_id": f"{consumer}-{i}-{uuid.uuid4()}",
                                          "processed_at": at} for i in range(n)])


def _count(engine, table: sa.Table) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_purge_processed_in_batches(engine):
    _processed(engine, 25, dt.timedelta(days=20))
    _processed(engine, 5, dt.timedelta(days=20), consumer="test.keep")
    _processed(engine, 7, dt.timedelta(days=1))
    assert purge_processed(engine, older_than=dt.timedelta(days=14), consumer="test.old", batch_size=10) == 25
    assert _count(engine, T.processed) == 12
    assert purge_processed(engine, older_than=dt.timedelta(days=14), batch_size=3) == 5
    assert _count(engine, T.processed) == 7


def test_purge_cli(engine, db_url, capsys):
    _processed(engine, 12, dt.timedelta(days=20))
    assert main(["purge", "processed", "--older-than", "14d", "--db", db_url, "--batch-size", "5"]) == 0
    assert "12" in capsys.readouterr().out
    now = dt.datetime.now(dt.timezone.utc)
    rows = [{"message_id": uuid.uuid4(), "topic": "t", "payload": b"x", "partition": 0, "created_at": now,
             "available_at": now, "status": st, "published_at": now - age}
            for st, age in (("published", dt.timedelta(days=10)), ("published", dt.timedelta(days=1)),
                            ("pending", dt.timedelta(days=10)))]
    with engine.begin() as c:
        c.execute(T.outbox.insert(), rows)
    assert main(["purge", "published", "--older-than", "7d", "--db", db_url, "--json"]) == 0
    assert '"purged": 1' in capsys.readouterr().out
    assert _count(engine, T.outbox) == 2
    assert main(["purge", "processed", "--older-than", "nonsense", "--db", db_url]) == 2


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_duplicates_leave_no_dead_tuples(engine, effects, recorder_cls, dead_tuple_check):
    consumer = recorder_cls()
    ids = [str(uuid.uuid4()) for _ in range(10_000)]

    def deliver() -> list[Status]:
        statuses = []
        for i in range(0, len(ids), 1000):
            batch = [IncomingMessage(id=x, topic="t", key=None, payload=b'{"n": 1}',
                                     content_type="application/json") for x in ids[i:i + 1000]]
            statuses += [o.status for o in consumer.process_batch(dead_tuple_check.nullpool, batch)]
        return statuses

    assert set(deliver()) == {Status.PROCESSED}
    assert dead_tuple_check.start()["inserted"] == 10_000  # the check sees what the consumer writes
    assert set(deliver()) == {Status.DUPLICATE}  # 10,000 duplicate deliveries
    dead_tuple_check.assert_no_new_tuples()


def test_purge_published_by_id_ranges(engine):
    """Batches of 2 over ranges of ids: only old published rows go, interleaved young and pending rows stay."""
    from outbox.retention import purge_published

    now = dt.datetime.now(dt.timezone.utc)
    kinds = [("published", dt.timedelta(days=10)), ("published", dt.timedelta(days=1)), ("pending", None)] * 4
    rows = [{"message_id": uuid.uuid4(), "topic": "t", "payload": b"x", "partition": 0, "created_at": now,
             "available_at": now, "status": st, "published_at": now - age if age else None} for st, age in kinds]
    with engine.begin() as c:
        c.execute(T.outbox.insert(), rows)
    assert purge_published(engine, older_than=dt.timedelta(days=7), batch_size=2) == 4
    with engine.connect() as c:
        left = c.execute(sa.select(T.outbox.c.status, T.outbox.c.published_at)).all()
    assert len(left) == 8 and sorted(st for st, _ in left) == ["pending"] * 4 + ["published"] * 4
