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


def _outbox_inserts(seen: list[tuple[str, bool, int]]) -> list[tuple[str, bool, int]]:
    return [s for s in seen if s[0].lstrip().upper().startswith(f"INSERT INTO {T.name.upper()}")]


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


def test_one_add_is_one_plain_insert(engine: sa.Engine, statements: list) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add(s, "cost", b"x")
    assert len(_outbox_inserts(statements)) == 1  # (on PostgreSQL Core adds RETURNING id to a one-row INSERT)


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
    assert sum("pg_notify" in st for st, _, _ in statements) == 1
    statements.clear()
    with Session(engine) as s, s.begin():
        for i in range(5):
            off.add(s, "cost", b"x", key=f"k{i}")
    assert not any("pg_notify" in st for st, _, _ in statements)
