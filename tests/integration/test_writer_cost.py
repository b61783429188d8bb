"""What the writer sends and registers: the properties its speed rests on (bench_writer.py measures it).

- ``add_many`` writes its rows with one ``executemany`` of a plain INSERT, no ``RETURNING id`` (the
  rows are mapped on their client-made ``message_id``), so no driver renders or parses a
  1,000-row INSERT ... RETURNING statement; on PostgreSQL with psycopg, from 10 rows, with one
  binary ``COPY`` instead (no INSERT at all), which falls back to the ``executemany`` when it fails;
- the session listeners are registered once on the ``Session`` class, never per session, and they
  leave sessions the writer never saw alone (no ``info`` dict made for them);
- NOTIFY costs one statement per committed transaction when on, none when off.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, default_tables

T = default_tables().outbox


@pytest.fixture
def statements(engine: sa.Engine) -> Iterator[list[tuple[str, bool, int]]]:
    """(statement, executemany, parameter sets) of every cursor execution on ``engine``."""
    seen: list[tuple[str, bool, int]] = []

    def note(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, executemany, len(parameters) if executemany else 1))

    event.listen(engine, "before_cursor_execute", note)
    yield seen
    event.remove(engine, "before_cursor_execute", note)


def _is_notify(statement: str) -> bool:
    return statement.lstrip().upper().startswith("NOTIFY")


def _is_outbox_insert(statement: str) -> bool:
    return statement.lstrip().upper().startswith(f"INSERT INTO {T.name.upper()}")


def _outbox_inserts(seen: list[tuple[str, bool, int]]) -> list[tuple[str, bool, int]]:
    return [s for s in seen if _is_outbox_insert(s[0])]


def test_add_many_is_one_executemany_without_returning(engine: sa.Engine, statements: list) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        ids = box.add_many(s, [OutgoingMessage("cost", b"x" * 200, key=f"k{i % 10}") for i in range(1000)])
    inserts = _outbox_inserts(statements)
    if engine.dialect.name == "postgresql":  # psycopg: one COPY, which no statement listener sees
        assert inserts == []
    else:
        assert len(inserts) == 1, inserts
        statement, many, sets = inserts[0]
        assert many and sets == 1000
        assert "RETURNING" not in statement.upper()
    with engine.connect() as c:  # the server still numbers them in add_many's order
        assert list(c.execute(sa.select(T.c.message_id).where(T.c.topic == "cost").order_by(T.c.id)).scalars()) \
            == ids


def test_one_add_is_one_plain_insert_without_returning(engine: sa.Engine, statements: list) -> None:
    """Watched (a cursor listener): ``Connection.execute``, which on PostgreSQL would add ``RETURNING id``
    to a one-row INSERT for a primary key nobody reads."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add(s, "cost", b"x")
    inserts = _outbox_inserts(statements)
    assert len(inserts) == 1, inserts
    assert "RETURNING" not in inserts[0][0].upper()


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_one_add_on_psycopgs_cursor_asks_for_no_result(engine: sa.Engine, psycopg_statements: list[str]) -> None:
    """Unwatched: the INSERT goes to psycopg's own cursor, as a plain INSERT (no result set to build)."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        mid = box.add(s, "cost", b"x")
    inserts = [q for q in psycopg_statements if _is_outbox_insert(q)]
    assert len(inserts) == 1, psycopg_statements
    assert "RETURNING" not in inserts[0].upper()
    with engine.connect() as c:
        assert c.execute(sa.select(T.c.message_id).where(T.c.topic == "cost")).scalar_one() == mid


def test_listeners_are_registered_once_and_leave_other_sessions_alone(engine: sa.Engine) -> None:
    box = Outbox()
    for _ in range(20):
        with Session(engine) as s, s.begin():
            box.add(s, "cost", b"x")
            # nothing on the session instance itself (a listen() per session cost more than add())
            assert not list(s.dispatch.after_transaction_end.listeners)
            assert not list(s.dispatch.after_soft_rollback.listeners)
    from outbox import writer

    with Session(engine) as s:
        class_level = [fn for fn in s.dispatch.after_transaction_end.parent_listeners if fn is writer._forget_ids]
    assert len(class_level) == 1
    with Session(engine) as other, other.begin():
        other.execute(sa.text("SELECT 1"))
    assert "info" not in other.__dict__


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_notify_is_one_statement_per_transaction_and_none_when_off(engine: sa.Engine, statements: list) -> None:
    on, off = Outbox(notify=True), Outbox()
    with Session(engine) as s, s.begin():
        for i in range(5):
            on.add(s, "cost", b"x", key=f"k{i}")
    assert sum(_is_notify(st) for st, _, _ in statements) == 1
    statements.clear()
    with Session(engine) as s, s.begin():
        for i in range(5):
            off.add(s, "cost", b"x", key=f"k{i}")
    assert not any(_is_notify(st) for st, _, _ in statements)


def test_add_rows_leave_the_orm_at_flush_written_by_one_core_insert(engine: sa.Engine, statements: list) -> None:
    """``add()``'s rows are pending ORM objects until the flush, which writes them with one INSERT
    of all their values and takes them out of the session: no unit-of-work INSERT, nothing kept in
    the identity map or expired at commit."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        ids = [box.add(s, "cost.flush", b"x", key="k") for _ in range(3)]
        assert len(s.new) == 3  # pending until the flush, as before
        s.flush()
        assert not s.new and not list(s.identity_map.values())
        inserts = _outbox_inserts(statements)
        assert len(inserts) == 1 and inserts[0][2] == 3, inserts  # the listener sees it: Connection.execute
        assert s.execute(sa.select(sa.func.count()).select_from(T).where(T.c.topic == "cost.flush")).scalar_one() == 3
    with engine.connect() as c:
        assert list(c.execute(sa.select(T.c.message_id).where(T.c.topic == "cost.flush").order_by(T.c.id))
                    .scalars()) == ids


def test_the_pending_row_maps_only_its_id_and_keeps_every_value(engine: sa.Engine) -> None:
    """The ORM walks every mapped property of a pending object at ``session.add`` and at ``expunge``:
    the row's mapper holds ``message_id`` alone, its other values are plain attributes, and those are
    what the flush writes (all of them)."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        mid = box.add(s, "cost.mapped", b"payload", key="k", headers={"h": "v"}, type="t")
        (row,) = s.new
        assert [p.key for p in sa.inspect(type(row)).attrs] == ["message_id"]
        assert (row.message_id, row.topic, row.key, row.payload) == (mid, "cost.mapped", "k", b"payload")
    with engine.connect() as c:
        got = c.execute(sa.select(T.c.topic, T.c.key, T.c.payload, T.c.headers, T.c.attributes, T.c.status,
                                  T.c.attempts, T.c.partition).where(T.c.message_id == mid)).one()
    assert got[:4] == ("cost.mapped", "k", b"payload", {"h": "v"})
    assert got.attributes["type"] == "t" and (got.status, got.attempts) == ("pending", 0)
    assert got.partition == row.partition


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_add_on_psycopg_skips_connection_execute_when_no_listener_watches(
    engine: sa.Engine, psycopg_statements: list[str]
) -> None:
    """With no cursor-execute listener (nothing that would miss it), the INSERT goes to psycopg's
    cursor directly; the statement-level ``before_execute`` event, which is not a cursor event,
    shows that ``Connection.execute`` did not run it."""
    sent = psycopg_statements
    core: list[str] = []

    def note(conn: Any, clause: Any, *_: Any) -> None:
        core.append(str(clause))

    event.listen(engine, "before_execute", note)
    try:
        box = Outbox()
        with Session(engine) as s, s.begin():
            mid = box.add(s, "cost.raw", b"x", key="k")
    finally:
        event.remove(engine, "before_execute", note)
    assert [q for q in sent if q.startswith(f"INSERT INTO {T.name}")], sent
    assert not [c for c in core if T.name in c], core
    with engine.connect() as c:
        assert c.execute(sa.select(T.c.message_id).where(T.c.topic == "cost.raw")).scalar_one() == mid


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_the_direct_insert_explains_a_duplicate_id_and_leaves_the_session_usable(engine: sa.Engine) -> None:
    from outbox import InvalidMessageId

    box = Outbox()
    with Session(engine) as s, s.begin():
        mid = box.add(s, "cost.dup", b"x")
    with Session(engine) as s:
        box.add(s, "cost.dup", b"again", message_id=mid)
        with pytest.raises(InvalidMessageId, match="committed earlier"):
            s.flush()
        s.rollback()
        box.add(s, "cost.dup", b"fine")
        s.commit()
    with engine.connect() as c:
        assert sorted(bytes(p) for p in c.execute(sa.select(T.c.payload).where(T.c.topic == "cost.dup")).scalars()) \
            == [b"fine", b"x"]


def test_savepoints_keep_the_rows_of_the_transaction_they_were_added_in(engine: sa.Engine) -> None:
    """A row added before ``begin_nested()`` is written before the SAVEPOINT (begin_nested flushes):
    rolling the savepoint back keeps it and drops only the rows added inside."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        before = box.add(s, "cost.sp", b"before")
        nested = s.begin_nested()
        box.add(s, "cost.sp", b"inside")
        s.flush()
        nested.rollback()
        after = box.add(s, "cost.sp", b"after")
    with engine.connect() as c:
        assert list(c.execute(sa.select(T.c.message_id).where(T.c.topic == "cost.sp").order_by(T.c.id))
                    .scalars()) == [before, after]


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_the_notification_reaches_a_listener_of_a_mixed_case_channel(engine: sa.Engine) -> None:
    """The writer sends ``NOTIFY "<table name>"``, quoted as the relay's ``LISTEN`` quotes it: a table
    name with capitals (a valid identifier) still wakes the relay, and only after the commit."""
    import psycopg

    from outbox import dialects

    params = engine.url.translate_connect_args(username="user", database="dbname")
    with psycopg.connect(autocommit=True, **params) as listener:
        listener.execute('LISTEN "Outbox_Mixed"')
        with engine.begin() as c:
            dialects.dialect_for(c).notify(c, "Outbox_Mixed")
            assert list(listener.notifies(timeout=0.2, stop_after=1)) == []  # not before the commit
        got = [n.channel for n in listener.notifies(timeout=10, stop_after=1)]
    assert got == ["Outbox_Mixed"]
