"""Id order vs commit order under concurrent writers (issue 9, item 10), on PostgreSQL and MariaDB.

The relay publishes the committed rows of a (topic, key) in id order. A row whose transaction
commits after later ids were already published goes out when it becomes visible, i.e. after them:
ids are handed out at insert time, not at commit. A writer makes the order causal by serialising
the writers of one aggregate: ``SELECT ... FOR UPDATE`` on the aggregate's row before ``add()``,
so the next writer gets its id only after the previous one committed (ids follow commit order).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"], indirect=True)

CFG = RelayConfig(progress_interval=0, lease_ttl=3.0)


@pytest.fixture
def aggregates(engine: sa.Engine) -> Iterator[sa.Table]:
    """A business table of the application's: one row per aggregate, with a version counter."""
    md = sa.MetaData()
    table = sa.Table(f"orders_{uuid.uuid4().hex[:8]}", md, sa.Column("id", sa.String(50), primary_key=True),
                     sa.Column("version", sa.Integer, nullable=False))
    md.create_all(engine)
    with engine.begin() as c:
        c.execute(table.insert().values(id="order-1", version=0))
    yield table
    md.drop_all(engine)


def published(pub: MemoryPublisher) -> list[tuple[int, dict]]:
    return [(m.id, json.loads(m.payload)) for m in pub.snapshot()]


def lock_waiters(engine: sa.Engine) -> int:
    """Transactions of this database waiting for a row lock right now."""
    with engine.connect() as c:
        if engine.dialect.name == "postgresql":
            q = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        else:
            # innodb_trx is server-wide: count only this database's sessions (other runs share the server)
            q = ("SELECT count(*) FROM information_schema.innodb_trx t JOIN information_schema.processlist p "
                 "ON p.id = t.trx_mysql_thread_id WHERE t.trx_state = 'LOCK WAIT' AND p.db = DATABASE()")
        return int(c.execute(sa.text(q)).scalar_one())


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_without_an_aggregate_lock_a_late_commit_is_published_after_later_ids(engine: sa.Engine) -> None:
    box, pub = Outbox(), MemoryPublisher()
    relay = Relay(engine, pub, config=CFG)
    added, release = threading.Event(), threading.Event()

    def slow_writer() -> None:  # begins first, gets the lower id, commits last
        with Session(engine) as s, s.begin():
            box.add(s, "orders", {"step": "created"}, key="order-1")
            s.flush()
            added.set()
            assert release.wait(60)

    def fast_writer() -> None:
        with Session(engine) as s, s.begin():
            for step in ("paid", "shipped"):
                box.add(s, "orders", {"step": step}, key="order-1")

    slow = threading.Thread(target=slow_writer)
    slow.start()
    try:
        assert added.wait(30)
        fast = threading.Thread(target=fast_writer)
        fast.start()
        fast.join(30)
        assert relay.drain() == 2  # the committed rows; the uncommitted one is invisible to the relay
    finally:
        release.set()
        slow.join(30)
    assert relay.drain() == 1
    relay.close()
    got = published(pub)
    assert [p["step"] for _, p in got] == ["paid", "shipped", "created"]  # commit order, not id order
    ids = [i for i, _ in got]
    assert ids[2] < ids[0] < ids[1]  # the late row has the lowest id, yet went out last


def test_with_the_aggregate_locked_before_add_published_order_is_commit_order(
        engine: sa.Engine, aggregates: sa.Table) -> None:
    box, pub = Outbox(), MemoryPublisher()
    relay = Relay(engine, pub, config=CFG)
    first_added, release = threading.Event(), threading.Event()
    committed: list[int] = []

    def writer(step: str, hold: bool) -> None:
        with Session(engine) as s, s.begin():
            # serialise the aggregate's writers: the second waits here until the first commits,
            # so its outbox row gets a higher id than every row committed before it
            version = s.execute(sa.select(aggregates.c.version).where(aggregates.c.id == "order-1")
                                .with_for_update()).scalar_one() + 1
            s.execute(aggregates.update().where(aggregates.c.id == "order-1").values(version=version))
            box.add(s, "orders", {"step": step, "version": version}, key="order-1")
            s.flush()
            if hold:
                first_added.set()
                assert release.wait(60)
        committed.append(version)

    first = threading.Thread(target=writer, args=("created", True))
    first.start()
    try:
        assert first_added.wait(30)
        second = threading.Thread(target=writer, args=("paid", False))
        second.start()
        wait_for(lambda: lock_waiters(engine) >= 1, 30, "the second writer to wait for the aggregate lock")
        assert relay.drain() == 0  # nothing committed yet
    finally:
        release.set()
        first.join(30)
    second.join(30)
    assert relay.drain() == 2
    relay.close()
    got = published(pub)
    assert [p["version"] for _, p in got] == committed == [1, 2]  # published in commit order
    assert [p["step"] for _, p in got] == ["created", "paid"]
    assert got[0][0] < got[1][0]  # and ids follow commit order
