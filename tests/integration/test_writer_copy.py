"""``add_many`` on PostgreSQL with psycopg: one binary COPY, in a savepoint that a failure rolls back.

A failed COPY hands its rows to the ``executemany`` (so a bad row's error is the same explained one
as without COPY), and a COPY that fails where the INSERT does not (column types that differ from
the toolkit's) is not tried again for that table.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from outbox import InvalidMessageId, Outbox, OutboxTables, OutgoingMessage, TableNames, default_tables

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
T = default_tables().outbox


@pytest.fixture
def inserts(engine: sa.Engine) -> Iterator[list[int]]:
    """The parameter-set count of every INSERT sent through a cursor."""
    seen: list[int] = []

    def note(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO"):
            seen.append(len(parameters) if executemany else 1)

    event.listen(engine, "before_cursor_execute", note)
    yield seen
    event.remove(engine, "before_cursor_execute", note)


def _messages(n: int, **kw: Any) -> list[OutgoingMessage]:
    return [OutgoingMessage("copy", f"{i}".encode(), key=f"k{i % 3}", **kw) for i in range(n)]


def test_rows_copied_have_every_column_as_an_insert_writes_it(engine: sa.Engine, inserts: list[int]) -> None:
    box = Outbox(source="svc")
    with Session(engine) as s, s.begin():
        box.add(s, "copy", b"first", key="k0")  # flushed before the COPY: it keeps the lowest id
        ids = box.add_many(s, _messages(20, headers={"h": "v"}, type="order.created"))
        box.add(s, "copy", b"last", key="k0")
    assert inserts == [1, 1]  # the two add()s: the 20 rows went by COPY
    with engine.connect() as c:
        rows = c.execute(sa.select(T).where(T.c.topic == "copy").order_by(T.c.id)).mappings().all()
    assert [bytes(r["payload"]) for r in rows] == [b"first", *(f"{i}".encode() for i in range(20)), b"last"]
    copied = rows[1:-1]
    assert [r["message_id"] for r in copied] == ids
    assert all(r["headers"] == {"h": "v"} for r in copied)
    assert all(r["attributes"] == {"type": "order.created", "source": "svc"} for r in copied)
    assert [r["key"] for r in copied] == [f"k{i % 3}" for i in range(20)]
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in copied)
    assert all(r["created_at"].tzinfo is not None for r in copied)


def test_a_copy_rolled_back_with_its_savepoint_leaves_nothing(engine: sa.Engine) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        sp = s.begin_nested()
        dropped = box.add_many(s, _messages(15))
        sp.rollback()
        kept = box.add_many(s, _messages(12))
        assert set(dropped).isdisjoint(kept)
        box.add_many(s, [OutgoingMessage("copy", b"again", message_id=dropped[0])])  # freed by the rollback
    with engine.connect() as c:
        got = list(c.execute(sa.select(T.c.message_id).where(T.c.topic == "copy").order_by(T.c.id)).scalars())
    assert got == [*kept, dropped[0]]


def test_a_duplicate_id_fails_the_copy_and_gets_the_explained_error(
    engine: sa.Engine, inserts: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        committed = box.add_many(s, _messages(10))
    inserts.clear()
    msgs = _messages(30)
    msgs[17] = OutgoingMessage("copy", b"dup", message_id=committed[4])
    with pytest.raises(InvalidMessageId, match=f"message_id {committed[4]} is already in the outbox table"), \
            Session(engine) as s, s.begin():
        box.add_many(s, msgs)
    assert inserts == [30]  # the COPY failed, its savepoint was rolled back, the INSERT said why
    with Session(engine) as s, s.begin():  # COPY is still used for this table: the INSERT failed as well
        box.add_many(s, _messages(10))
    assert inserts == [30]
    assert not [r for r in caplog.records if r.name == "outbox.writer"]
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T).where(T.c.topic == "copy")).scalar_one() == 20


def test_a_copy_that_fails_where_the_insert_does_not_is_not_tried_again(
    engine: sa.Engine, inserts: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    tables = OutboxTables(TableNames(outbox=f"copy_{uuid.uuid4().hex[:8]}"))
    tables.outbox.create(engine)
    try:
        with engine.begin() as c:  # a column whose type differs from the toolkit's: binary COPY refuses jsonb data
            c.execute(sa.text(f"ALTER TABLE {tables.outbox.name} ALTER COLUMN headers TYPE json"))
        box = Outbox(tables=tables)
        for _ in range(2):
            with Session(engine) as s, s.begin():
                box.add_many(s, [OutgoingMessage("copy", b"x", headers={"a": "b"}) for _ in range(12)])
        assert inserts == [12, 12]  # the first after a failed COPY, the second without trying COPY
        said = [r for r in caplog.records if r.name == "outbox.writer"]
        assert len(said) == 1 and tables.outbox.name in said[0].getMessage()
        with engine.connect() as c:
            n = c.execute(sa.select(sa.func.count()).select_from(tables.outbox)).scalar_one()
        assert n == 24
    finally:
        tables.outbox.drop(engine)


def test_a_schema_translate_map_is_honoured(engine: sa.Engine, inserts: list[int]) -> None:
    box = Outbox()
    mapped = engine.execution_options(schema_translate_map={None: "public"})
    with Session(mapped) as s, s.begin():
        box.add_many(s, _messages(10))
    assert inserts == [10]  # the executemany, which applies the map (the COPY would not)
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T).where(T.c.topic == "copy")).scalar_one() == 10
