"""The relay on a table that once held a large backlog (PostgreSQL).

Draining a backlog leaves the primary-key index as large as the backlog was, while vacuum
truncates the emptied heap: the next, small, backlog sits in a tiny table with a huge index. The
relay's statements must stay cheap there, and above all its DELETE of a batch by id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, default_tables, migrations
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)

T = default_tables().outbox


@pytest.fixture
def drained(fresh_database: str) -> Iterator[sa.Engine]:
    """A database whose outbox table held 200,000 rows, all deleted and vacuumed, then 3,000 new ones."""
    engine = sa.create_engine(fresh_database)
    migrations.upgrade(engine)
    with engine.begin() as c:
        c.execute(sa.text(f"INSERT INTO {T.name} (message_id, topic, payload, partition, created_at, available_at, "
                          "status) SELECT gen_random_uuid(), 't', '\\x00', g % 16, now(), '1970-01-01', 'pending' "
                          "FROM generate_series(1, 200000) g"))
        c.execute(sa.text(f"DELETE FROM {T.name}"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f"VACUUM {T.name}"))
    with Session(engine) as s, s.begin():
        Outbox().add_many(s, [OutgoingMessage("orders", {"seq": i}, key=f"k{i % 50}") for i in range(3000)])
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f"VACUUM ANALYZE {T.name}"))
    yield engine
    engine.dispose()


def test_the_batch_delete_stays_cheap_when_the_index_outgrew_the_table(drained: sa.Engine) -> None:
    """With the ids sent as ``CAST('{1,2,...}' AS BIGINT[])`` the planner could not see the array: it
    chose a sequential scan comparing each of the 3,000 rows with all 1,000 ids (about 0.5 s a batch
    here; 1-2.5 s on a 10,000-row table after a 1,000,000-row backlog, which took the relay from 25,000
    to under 1,000 msg/s). The relay's DELETE, planned as a connection's first executions are (custom
    plans), must take milliseconds, and the drain must publish and delete every row."""
    with drained.connect() as c:
        index_pages, heap_pages = c.execute(sa.text(
            "SELECT (SELECT relpages FROM pg_class WHERE relname = :i), (SELECT relpages FROM pg_class "
            "WHERE relname = :t)"), {"i": f"{T.name}_pkey", "t": T.name}).one()
    assert index_pages > 3 * heap_pages  # the state this test is about

    deletes: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, params, context, executemany) -> None:
        if statement.startswith(f"DELETE FROM {T.name} ") and not deletes:
            deletes.append((statement, params))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", capture)
    try:
        publisher = MemoryPublisher()
        relay = Relay(drained, publisher, config=RelayConfig(batch_size=1000, progress_interval=0))
        try:
            assert relay.drain() == 3000
        finally:
            relay.close()
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", capture)
    assert len(publisher.messages) == 3000
    with drained.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar() == 0

    # the same statement with the same ids, on the same table state: the rows are put back first
    with Session(drained) as s, s.begin():
        Outbox().add_many(s, [OutgoingMessage("orders", {"seq": i}, key=f"k{i % 50}") for i in range(3000)])
    with drained.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f"VACUUM ANALYZE {T.name}"))
    statement, params = deletes[0]
    raw = drained.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("SELECT array_agg(id ORDER BY id) FROM (SELECT id FROM outbox_messages ORDER BY id LIMIT 1000) s")
        ids = cur.fetchone()[0]
        assert isinstance(params, dict)
        text = ",".join(map(str, ids))  # in the form the captured statement takes its ids
        params = {**params, "row_ids": text if "string_to_array" in statement else "{" + text + "}"}
        cur.execute("SET plan_cache_mode = force_custom_plan")
        t0 = time.perf_counter()
        cur.execute(statement, params)
        took = time.perf_counter() - t0
        assert cur.rowcount == 1000
        raw.rollback()
    finally:
        raw.close()
    assert took < 0.1, f"the relay's DELETE of 1,000 ids took {took * 1000:.0f} ms"
