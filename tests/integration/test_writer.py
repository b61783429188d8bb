"""The writer on real databases: rows commit and roll back with the business rows."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import (
    InvalidDeliveryTime,
    InvalidHeaders,
    InvalidKey,
    InvalidMessageId,
    InvalidTopic,
    MessageError,
    Outbox,
    OutgoingMessage,
    PayloadTooLarge,
    SerializationError,
    default_tables,
    partition_for,
)
from outbox.schema import DUE_NOW

biz = sa.MetaData()
orders = sa.Table(
    "test_orders",
    biz,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("total", sa.Integer, nullable=False),
)
T = default_tables().outbox


@pytest.fixture
def business(engine: sa.Engine):
    biz.create_all(engine)
    with engine.begin() as c:
        c.execute(orders.delete())
    yield engine
    with engine.begin() as c:
        c.execute(orders.delete())


def counts(engine: sa.Engine) -> tuple[int, int]:
    with engine.connect() as c:
        return (
            c.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one(),
            c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one(),
        )


@dataclasses.dataclass
class OrderPlaced:
    order_id: int
    total: int


def test_commit_keeps_both_rows_and_the_row_is_right(business: sa.Engine) -> None:
    box = Outbox(partitions=16)
    with Session(business) as s, s.begin():
        s.execute(orders.insert().values(id=1, total=99))
        mid = box.add(s, "orders.placed", OrderPlaced(1, 99), key="order-1", headers={"trace": "abc"})
    assert counts(business) == (1, 1)
    with business.connect() as c:
        row = c.execute(sa.select(T)).one()
    assert row.message_id == mid and mid.version == 7
    assert json.loads(row.payload) == {"order_id": 1, "total": 99}
    assert row.content_type == "application/json"
    assert row.headers == {"trace": "abc"}
    assert row.key == "order-1" and row.topic == "orders.placed"
    assert row.partition == partition_for("order-1", mid, 16)
    assert row.status == "pending" and row.attempts == 0
    assert row.created_at.tzinfo is not None and row.available_at == DUE_NOW  # due at once


def test_rollback_leaves_neither(business: sa.Engine) -> None:
    box = Outbox()
    with Session(business) as s:
        s.begin()
        s.execute(orders.insert().values(id=2, total=5))
        box.add(s, "orders.placed", {"id": 2})
        s.flush()
        s.rollback()
    assert counts(business) == (0, 0)


def test_writer_never_flushes_or_commits(business: sa.Engine) -> None:
    box = Outbox()
    with Session(business, autoflush=False) as s:
        box.add(s, "t", b"x")
        assert len(s.new) == 1  # pending in the session, not yet in the database
        with business.connect() as c:
            assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 0
        s.rollback()
    assert counts(business) == (0, 0)


def test_rolled_back_savepoint_drops_only_its_messages(business: sa.Engine) -> None:
    box = Outbox()
    with Session(business) as s, s.begin():
        s.execute(orders.insert().values(id=3, total=1))
        kept = box.add(s, "t", "kept")
        sp = s.begin_nested()
        box.add(s, "t", "dropped")
        s.execute(orders.insert().values(id=4, total=2))
        sp.rollback()
        kept2 = box.add(s, "t", "kept too")
    with business.connect() as c:
        ids = set(c.execute(sa.select(T.c.message_id)).scalars())
    assert ids == {kept, kept2}
    assert counts(business) == (1, 2)


def test_add_many_ten_thousand(business: sa.Engine) -> None:
    box = Outbox()
    msgs = [OutgoingMessage("bulk", {"n": i}, key=f"k{i % 100}") for i in range(10_000)]
    with Session(business) as s, s.begin():
        ids = box.add_many(s, msgs)
    assert len(set(ids)) == 10_000
    with business.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 10_000
        # the autoincrement id follows the order of add_many, so relays publish in that order
        order = list(c.execute(sa.select(T.c.message_id).order_by(T.c.id)).scalars())
    assert order == ids


def test_delayed_message_gets_available_at(business: sa.Engine) -> None:
    box = Outbox()
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    with Session(business) as s, s.begin():
        a = box.add(s, "t", b"1", deliver_at=when)
        b = box.add(s, "t", b"2", delay=dt.timedelta(minutes=5))
    with business.connect() as c:
        rows = {r.message_id: r for r in c.execute(sa.select(T))}
    assert abs((rows[a].available_at - when).total_seconds()) < 0.001
    gap = (rows[b].available_at - rows[b].created_at).total_seconds()
    assert abs(gap - 300) < 0.001


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"payload": {1, 2}}, SerializationError, "set"),
        ({"payload": object()}, SerializationError, "object"),
        ({"payload": b"x" * 2000}, PayloadTooLarge, "2,000 bytes"),
        ({"topic": "bad topic!"}, InvalidTopic, "bad topic!"),
        ({"topic": ""}, InvalidTopic, "not a valid topic"),
        ({"topic": "x" * 250}, InvalidTopic, "249"),
        ({"key": 42}, InvalidKey, "int"),
        ({"key": "k" * 300}, InvalidKey, "255"),
        ({"headers": {"a": 1}}, InvalidHeaders, "'a'"),
        ({"headers": {1: "a"}}, InvalidHeaders, "int"),
        ({"headers": ["a"]}, InvalidHeaders, "mapping"),
        ({"message_id": "nope"}, InvalidMessageId, "nope"),
        ({"deliver_at": dt.datetime(2030, 1, 1)}, InvalidDeliveryTime, "naive"),
        ({"deliver_at": dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc)}, InvalidDeliveryTime, "in the past"),
        ({"delay": -1}, InvalidDeliveryTime, "negative"),
        ({"delay": 1, "deliver_at": dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)}, InvalidDeliveryTime, "not both"),
    ],
)
def test_validation_errors_name_the_problem_and_leave_the_session_usable(
    business: sa.Engine, kwargs: dict, error: type[Exception], text: str
) -> None:
    box = Outbox(max_payload_bytes=1000)
    args = {"topic": "t", "payload": b"ok", **kwargs}
    with Session(business) as s, s.begin():
        s.execute(orders.insert().values(id=10, total=1))
        with pytest.raises(error) as info:
            box.add(s, args.pop("topic"), args.pop("payload"), **args)
        assert isinstance(info.value, MessageError)
        assert text in str(info.value)
        box.add(s, "t", b"fine")
    assert counts(business) == (1, 1)


def test_add_many_is_all_or_nothing(business: sa.Engine) -> None:
    box = Outbox()
    with Session(business) as s, s.begin():
        with pytest.raises(InvalidTopic, match="message #2"):
            box.add_many(s, [{"topic": "a", "payload": 1}, {"topic": "b", "payload": 2}, {"topic": "?", "payload": 3}])
        assert not s.new
    assert counts(business) == (0, 0)


def test_naive_datetimes_can_be_read_as_utc(business: sa.Engine) -> None:
    box = Outbox(naive_datetimes="utc")
    naive = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(minutes=1)
    with Session(business) as s, s.begin():
        box.add(s, "t", b"x", deliver_at=naive)
    with business.connect() as c:
        got = c.execute(sa.select(T.c.available_at)).scalar_one()
    assert got == naive.replace(tzinfo=dt.timezone.utc)


def test_explicit_message_id_is_unique(business: sa.Engine) -> None:
    box = Outbox()
    mid = uuid.uuid4()
    with Session(business) as s, s.begin():
        assert box.add(s, "t", b"1", message_id=str(mid)) == mid
    with pytest.raises(InvalidMessageId, match=f"message_id {mid} is already in the outbox table") as info, \
            Session(business) as s, s.begin():
        box.add(s, "t", b"2", message_id=mid)
    assert isinstance(info.value.__cause__, Exception)  # the driver's unique-violation error


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"], indirect=True)
def test_async_session_commit_rollback_savepoint(business: sa.Engine, async_db_url: str) -> None:
    box = Outbox()

    async def run() -> None:
        aeng = create_async_engine(async_db_url)
        try:
            async with AsyncSession(aeng) as s, s.begin():
                await s.execute(orders.insert().values(id=20, total=1))
                box.add(s, "t", {"async": True}, key="a")
                sp = await s.begin_nested()
                box.add(s, "t", "dropped")
                await sp.rollback()
            async with AsyncSession(aeng) as s:
                await s.begin()
                await s.execute(orders.insert().values(id=21, total=1))
                box.add(s, "t", "rolled back")
                await s.rollback()
        finally:
            await aeng.dispose()

    asyncio.run(run())
    with business.connect() as c:
        rows = c.execute(sa.select(T.c.payload)).scalars().all()
    assert [json.loads(p) for p in rows] == [{"async": True}]
    assert counts(business) == (1, 1)


def test_pydantic_payload(business: sa.Engine) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Shipped(pydantic.BaseModel):
        order_id: int
        at: dt.datetime

    box = Outbox()
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    with Session(business) as s, s.begin():
        box.add(s, "t", Shipped(order_id=7, at=when))
    with business.connect() as c:
        assert json.loads(c.execute(sa.select(T.c.payload)).scalar_one()) == {
            "order_id": 7, "at": "2026-01-02T03:04:05Z"}


def test_duplicate_id_detection_follows_savepoints_and_transactions(business: sa.Engine) -> None:
    box = Outbox()
    a, b = uuid.uuid4(), uuid.uuid4()
    with Session(business) as s:
        with s.begin():
            with s.begin_nested():  # released: its rows belong to the transaction
                box.add(s, "t", b"1", message_id=a)
            with pytest.raises(InvalidMessageId, match=str(a)):
                box.add(s, "t", b"again", message_id=a)
            sp = s.begin_nested()
            box.add(s, "t", b"2", message_id=b)
            s.flush()
            sp.rollback()  # gone with its savepoint: the id is free again
            box.add(s, "t", b"2 again", message_id=b)
        with s.begin():  # a new transaction starts with a clean slate; the committed id is in the table
            box.add(s, "t", b"3")
        c = uuid.uuid4()
        s.begin()
        box.add(s, "t", b"4", message_id=c)
        s.rollback()
        with s.begin():
            box.add(s, "t", b"4 after rollback", message_id=c)
    with business.connect() as conn:
        got = sorted(bytes(p) for p in conn.execute(sa.select(T.c.payload)).scalars())
    assert got == [b"1", b"2 again", b"3", b"4 after rollback"]


def test_add_many_on_a_session_writes_at_once_in_its_transaction_and_savepoints(business: sa.Engine) -> None:
    """On a sync ``Session`` ``add_many`` writes its rows at once (one Core executemany, no ORM rows);
    they still commit or roll back with the transaction and its savepoints, keep the order in which
    the messages were added (after rows ``add()`` left pending), and their ids are still refused a
    second time in the same transaction, until a rollback frees them."""
    box = Outbox()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def msgs(*pairs: tuple[bytes, uuid.UUID | None]) -> list[OutgoingMessage]:
        return [OutgoingMessage("t", p, key="k", message_id=mid) for p, mid in pairs]

    with Session(business) as s:
        with s.begin():
            box.add(s, "t", b"0", key="k")  # pending in the session: flushed before add_many's rows
            box.add_many(s, msgs((b"1", a)))
            assert not [o for o in s.new]  # nothing of add_many's is held by the ORM
            with pytest.raises(InvalidMessageId, match=str(a)):
                box.add_many(s, msgs((b"again", a)))
            with pytest.raises(InvalidMessageId, match=str(a)):
                box.add(s, "t", b"again", message_id=a)
            with s.begin_nested():  # released: its rows belong to the transaction
                box.add_many(s, msgs((b"2", b)))
            with pytest.raises(InvalidMessageId, match=str(b)):
                box.add_many(s, msgs((b"again", b)))
            sp = s.begin_nested()
            box.add_many(s, msgs((b"3", c)))
            sp.rollback()  # gone with its savepoint: the id is free again
            box.add_many(s, msgs((b"3 again", c)))
            box.add(s, "t", b"4", key="k")
        d = uuid.uuid4()
        s.begin()
        box.add_many(s, msgs((b"5", d)))
        s.rollback()
        with s.begin():
            box.add_many(s, msgs((b"5 after rollback", d)))
    with business.connect() as conn:
        got = [bytes(p) for p in conn.execute(sa.select(T.c.payload).order_by(T.c.id)).scalars()]
    assert got == [b"0", b"1", b"2", b"3 again", b"4", b"5 after rollback"]


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"], indirect=True)
def test_add_many_on_an_async_session_is_written_with_its_flush(business: sa.Engine, async_db_url: str) -> None:
    box = Outbox()

    async def go() -> None:
        eng = create_async_engine(async_db_url)
        try:
            async with AsyncSession(eng) as s:
                async with s.begin():
                    ids = box.add_many(s, [OutgoingMessage("t", f"{i}".encode(), key="k") for i in range(3)])
                    assert len(s.new) == 3  # no I/O here: ORM rows, written at the flush
                async with s.begin():
                    box.add_many(s, [OutgoingMessage("t", b"dup", message_id=ids[0])])
                    with pytest.raises(InvalidMessageId, match="committed earlier"):
                        await s.flush()  # committed before: the table refuses it at the flush
        finally:
            await eng.dispose()

    asyncio.run(go())
    with business.connect() as conn:
        assert [bytes(p) for p in conn.execute(sa.select(T.c.payload).order_by(T.c.id)).scalars()] == [b"0", b"1", b"2"]
