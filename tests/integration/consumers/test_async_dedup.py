"""AsyncDedupConsumer / AsyncStagedConsumer on every async driver: psycopg and asyncpg (PostgreSQL),
aiosqlite (SQLite), asyncmy (MariaDB). The algorithm is the sync consumer's; these tests check that the
asyncio driver runs all of it, on real databases."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from consumers import (
    AsyncDedupConsumer,
    AsyncStagedConsumer,
    ConfigurationError,
    IncomingMessage,
    Status,
    list_dead_letters,
    requeue_dead_letters,
    stage,
)
from outbox.errors import DecodeError
from outbox.schema import default_tables
from tests.integration.consumers.conftest import EFFECTS, AsyncRecorder

T = default_tables()

#: (the conftest's dialect, the async driver's URL scheme)
DRIVERS = [("sqlite", "sqlite+aiosqlite"), ("postgresql", "postgresql+psycopg"),
           ("postgresql", "postgresql+asyncpg"), ("mariadb", "mysql+asyncmy")]


@pytest.fixture(params=DRIVERS, ids=[d[1] for d in DRIVERS])
def driver(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def dialect_name(driver: tuple[str, str]) -> str:
    """Overrides the conftest's parametrised dialect: the migrated sync ``engine`` of the driver's database."""
    return driver[0]


@pytest.fixture
async def aengine(driver: tuple[str, str], db_url: str, engine: sa.Engine, effects: sa.Table
                  ) -> AsyncIterator[AsyncEngine]:
    url = make_url(db_url).set(drivername=driver[1])
    eng = create_async_engine(url, connect_args={"timeout": 30} if driver[0] == "sqlite" else {})
    yield eng
    await eng.dispose()


def msg(msg_id: str | None = None, payload: bytes = b'{"n": 1}', headers: dict[str, str] | None = None
        ) -> IncomingMessage:
    """A message with ``msg_id`` (a new uuid by default; ``""``: none at all)."""
    return IncomingMessage(id=str(uuid.uuid4()) if msg_id is None else msg_id or None, topic="orders", key="k",
                           payload=payload, headers={"h": "v"} if headers is None else headers,
                           content_type="application/json")


async def test_processed_then_duplicate_returns_the_stored_result(aengine, count_effects):
    c = AsyncRecorder()
    m = msg(payload=b'{"n": 7}')
    first = await c.process(aengine, m)
    assert first.status is Status.PROCESSED and first.done
    assert first.result == {"seen": m.id, "n": 7}
    again = await c.process(aengine, msg(m.id, b'{"n": 7}'))
    assert again.status is Status.DUPLICATE
    assert again.result == {"seen": m.id, "n": 7}  # the stored result, read back from the database
    assert count_effects(m.id) == 1 and c.calls == [m.id]


async def test_same_id_twice_in_a_batch_and_a_list_through_process(aengine, count_effects):
    c = AsyncRecorder()
    a, b = msg(), msg()
    outs = await c.process(aengine, [a, msg(a.id), b])
    assert [o.status for o in outs] == [Status.PROCESSED, Status.DUPLICATE, Status.PROCESSED]
    assert count_effects() == 2


async def test_failing_handler_is_redone_with_savepoints_and_isolated(aengine, count_effects):
    c = AsyncRecorder()
    good1, bad, good2 = msg(), msg(), msg()
    c.failing.add(bad.id)  # type: ignore[arg-type]
    committed: list[bool] = []

    async def before_commit() -> None:  # an async hook is awaited just before the commit
        committed.append(True)

    outs = await c.process_batch(aengine, [good1, bad, good2], before_commit=before_commit)
    assert [o.status for o in outs] == [Status.PROCESSED, Status.RETRY, Status.PROCESSED]
    assert outs[1].retry_in is not None and isinstance(outs[1].error, RuntimeError)
    assert committed == [True]
    assert count_effects(good1.id) == 1 and count_effects(good2.id) == 1
    assert count_effects(bad.id) == 0  # its effect rolled back with its savepoint
    async with aengine.connect() as conn:
        ids = set((await conn.execute(sa.select(T.processed.c.message_id))).scalars())
    assert ids == {good1.id, good2.id}  # and its dedup row too


async def test_a_failed_hook_rolls_back_the_whole_redone_batch(aengine, count_effects):
    """The redo's first SAVEPOINT must not begin (and its RELEASE commit) the transaction (aiosqlite too)."""
    c = AsyncRecorder()
    good, bad = msg(), msg()
    c.failing.add(bad.id)  # type: ignore[arg-type]

    def hook() -> None:
        raise OSError("broker gone before the commit")

    with pytest.raises(OSError):
        await c.process_batch(aengine, [good, bad], before_commit=hook)
    assert count_effects() == 0


async def test_poison_goes_dead_after_max_attempts_while_others_pass(aengine, engine, count_effects):
    c = AsyncRecorder()
    poison, ok = msg(), msg()
    c.failing.add(poison.id)  # type: ignore[arg-type]
    once = await c.process(aengine, poison)
    assert once.status is Status.RETRY and not once.done and poison.attempt == 2  # next try counted
    outs = await c.process_until_done(aengine, [poison, ok])
    assert [o.status for o in outs] == [Status.DEAD, Status.PROCESSED]
    dead = list_dead_letters(engine, consumer=c.name)
    assert [(d["message_id"], d["attempts"]) for d in dead] == [(poison.id, c.max_attempts)]
    assert count_effects(poison.id) == 0 and count_effects(ok.id) == 1


async def test_non_retriable_and_no_id_are_dead_at_once(aengine, engine, count_effects):
    class Strict(AsyncRecorder):
        async def handle(self, session: AsyncSession, message: IncomingMessage) -> object:
            raise DecodeError("not the schema we read")

    c = Strict(id_from="header:X-Id")
    undecodable = msg(payload=b"x", headers={"X-Id": "a"})
    no_id = msg("", headers={})
    outs = await c.process(aengine, [undecodable, no_id])
    assert [o.status for o in outs] == [Status.DEAD, Status.DEAD]
    assert undecodable.attempt == 1
    assert sorted(d["error"].split(":")[0] for d in list_dead_letters(engine, consumer=c.name)) == \
        ["DecodeError", "MessageIdMissing"]
    again = await c.process(aengine, msg("", headers={}))  # redelivered: the same dead letter, no second row
    assert again.status is Status.DEAD and len(list_dead_letters(engine, consumer=c.name)) == 2
    assert count_effects() == 0


async def test_requeued_dead_letters_are_processed_again(aengine, engine, count_effects):
    c = AsyncRecorder()
    m = msg()
    c.failing.add(m.id)  # type: ignore[arg-type]
    assert (await c.process_until_done(aengine, m))[0].status is Status.DEAD
    c.failing.clear()
    assert requeue_dead_letters(engine, consumer=c.name) == 1
    outs = await c.process_requeued(aengine)
    assert [o.status for o in outs] == [Status.PROCESSED]
    assert [d["status"] for d in list_dead_letters(engine, consumer=c.name)] == ["resolved"]
    assert count_effects(m.id) == 1
    assert await c.process_requeued(aengine) == []


async def test_content_hash_ids(aengine, count_effects):
    c = AsyncRecorder(id_strategy="content-hash")
    outs = await c.process(aengine, [msg("one"), msg("two")])  # same content, different ids: one effect
    assert [o.status for o in outs] == [Status.PROCESSED, Status.DUPLICATE]
    assert count_effects() == 1


async def test_two_tasks_with_the_same_id_at_once_give_one_effect(aengine, count_effects):
    c = AsyncRecorder()
    ids = [str(uuid.uuid4()) for _ in range(10)]
    for i in ids:
        outs = await asyncio.gather(c.process(aengine, msg(i)), c.process(aengine, msg(i)))
        assert sorted(o.status.value for o in outs) == ["duplicate", "processed"], outs
        assert outs[0].result == outs[1].result == {"seen": i, "n": 1}
    assert count_effects() == len(ids)
    assert all(count_effects(i) == 1 for i in ids)


class AsyncSteps(AsyncStagedConsumer):
    name = "test.async-staged"
    retry_initial = 0.001
    retry_max = 0.01
    retry_jitter = 0.001

    def __init__(self) -> None:
        super().__init__()
        self.fail_label = True
        self.ran: list[str] = []

    @stage("reserve")
    async def reserve(self, session: AsyncSession, message: IncomingMessage) -> object:
        self.ran.append("reserve")
        await session.execute(EFFECTS.insert().values(message_id=message.id, value="reserve"))
        return {"slot": 3}

    @stage("label")
    async def label(self, session: AsyncSession, message: IncomingMessage) -> object:
        self.ran.append("label")
        if self.fail_label:
            raise RuntimeError("label printer offline")
        return {"label": message.stage_results["reserve"]["slot"]}


async def test_staged_resumes_at_the_unfinished_stage(aengine, count_effects):
    c = AsyncSteps()
    m = msg()
    first = await c.process(aengine, m)
    assert first.status is Status.RETRY
    c.fail_label = False
    second = await c.process(aengine, m)
    assert second.status is Status.PROCESSED
    assert second.result == {"reserve": {"slot": 3}, "label": {"label": 3}}
    assert c.ran == ["reserve", "label", "label"]  # reserve is not repeated
    dup = await c.process(aengine, msg(m.id))
    assert dup.status is Status.DUPLICATE and dup.result == second.result
    assert count_effects(m.id) == 1


@pytest.mark.parametrize("driver", [("postgresql", "postgresql+psycopg"), ("postgresql", "postgresql+asyncpg")],
                         ids=["psycopg", "asyncpg"], indirect=True)
async def test_duplicates_leave_no_dead_tuples(aengine, dead_tuple_check):
    c = AsyncRecorder()
    ids = [str(uuid.uuid4()) for _ in range(10_000)]
    dead_tuple_check.watch(aengine.sync_engine)

    async def deliver() -> set[Status]:
        statuses: set[Status] = set()
        for i in range(0, len(ids), 1000):
            statuses |= {o.status for o in await c.process_batch(aengine, [msg(x) for x in ids[i:i + 1000]])}
        return statuses

    assert await deliver() == {Status.PROCESSED}
    assert dead_tuple_check.start()["inserted"] == 10_000  # the check sees what the consumer writes
    assert await deliver() == {Status.DUPLICATE}  # 10,000 duplicate deliveries
    dead_tuple_check.assert_no_new_tuples()


@pytest.mark.parametrize("driver", [("sqlite", "sqlite+aiosqlite")], ids=["aiosqlite"], indirect=True)
async def test_mistakes_are_refused_with_what_to_do(aengine, engine):
    class SyncHandle(AsyncDedupConsumer):
        name = "test.sync-handle"

        def handle(self, session, message):  # type: ignore[override]
            return None

    with pytest.raises(ConfigurationError, match="async def"):
        SyncHandle()

    class SyncStage(AsyncStagedConsumer):
        name = "test.sync-stage"

        @stage("one")
        def one(self, session, message):
            return None

    with pytest.raises(ConfigurationError, match=r"stage 'one'.*async def"):
        SyncStage()
    with pytest.raises(ConfigurationError, match="AsyncEngine"):
        await AsyncRecorder().process(engine, msg())  # a sync Engine


@pytest.mark.parametrize("driver", [("postgresql", "postgresql+psycopg")], ids=["psycopg"], indirect=True)
async def test_stored_results_read_one_index_entry_per_duplicate(aengine, engine, db_url):
    """A consumer whose rows arrived after the last ANALYZE: the duplicates' stored results must not scan all of
    its rows (``WHERE consumer = :c AND message_id IN (...)`` did: 70 ms a batch at 45,000 rows, growing)."""
    table = T.processed.name
    with engine.begin() as conn:
        conn.execute(sa.text(f"ANALYZE {table}"))  # statistics from before this consumer's rows
        conn.execute(sa.text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    nullpool = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        c = AsyncRecorder()
        ids = [str(uuid.uuid4()) for _ in range(20_000)]
        with engine.begin() as conn:
            now = dt.datetime.now(dt.timezone.utc)
            conn.execute(T.processed.insert(), [{"consumer": c.name, "message_id": i, "processed_at": now}
                                                for i in ids])

        def index_reads() -> int:
            with nullpool.connect() as conn:
                conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
                conn.commit()
            with nullpool.connect() as conn:
                return int(conn.execute(sa.text("SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes "
                                                "WHERE relname = :t"), {"t": table}).scalar_one())

        await aengine.dispose()
        before = index_reads()
        outs = await c.process(aengine, [msg(i) for i in ids[:50]])  # 50 duplicates
        await aengine.dispose()
        assert {o.status for o in outs} == {Status.DUPLICATE}
        reads = index_reads() - before
        assert reads < 1_000, f"{reads} index entries read for 50 duplicates"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE {table} RESET (autovacuum_enabled)"))
        nullpool.dispose()


def _raced(base: type, engine: sa.Engine, racing_id: str) -> tuple[AsyncDedupConsumer, list[object]]:
    """A ``base`` consumer whose handler of ``racing_id`` first has a sync consumer of the same name
    commit that id on another connection (its outcomes go into the list returned)."""
    from consumers import DedupConsumer

    class Other(DedupConsumer):
        name = base.name

        def handle(self, session, message):
            session.execute(EFFECTS.insert().values(message_id=message.id, value="other"))
            return {"by": "other"}

    other_out: list[object] = []

    class Raced(base):  # type: ignore[misc,valid-type]
        async def handle(self, session, message):
            result = await super().handle(session, message)
            if message.id == racing_id and not other_out:
                other_out.append(await asyncio.to_thread(Other().process_batch, engine, [msg(racing_id)]))
            return result

    return Raced(), other_out


async def test_an_id_a_concurrent_consumer_commits_after_the_read_is_redone_under_asyncio(
        aengine, engine, count_effects):
    """The asyncio consumer runs the same read-first path: a sync consumer on another connection
    commits the racing id while the async handler runs; the async batch's insert at the end hits the
    unique key, rolls back and is redone inserting first: a duplicate with the other's result."""

    from outbox.dialects import dialect_for

    with engine.connect() as conn:
        if not dialect_for(engine).inserts_keys_at_end(conn, T.processed):
            pytest.skip("this dialect inserts the ids first (no read first)")

    racing, rest = msg(payload=b'{"n": 7}'), msg(payload=b'{"n": 8}')
    a, other_out = _raced(AsyncRecorder, engine, racing.id)
    out = await a.process_batch(aengine, [racing, rest])
    assert [o.status for o in other_out[0]] == [Status.PROCESSED]  # type: ignore[index]
    assert [o.status for o in out] == [Status.DUPLICATE, Status.PROCESSED]
    assert out[0].result == {"by": "other"}
    assert sorted(a.calls) == sorted([racing.id, rest.id, rest.id])
    assert count_effects(racing.id) == 1 and count_effects(rest.id) == 1


# ------------------------------------------------------------------ the dedup insert sent ahead of the flush
class _Effect:
    """The effects table as an ORM class: a handler's ``session.add`` leaves its row to the flush."""

    def __init__(self, message_id: str, value: str) -> None:
        self.message_id = message_id
        self.value = value


sa.orm.registry().map_imperatively(_Effect, EFFECTS)


class OrmRecorder(AsyncRecorder):
    """:class:`AsyncRecorder` whose effect is a pending ORM row, written by the batch's flush."""

    async def handle(self, session, message):
        self.calls.append(message.id)
        session.add(_Effect(message.id, str(message.body)))
        return {"seen": message.id}


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements psycopg's asyncio cursors send, in the order they reach the driver (first words)."""
    import psycopg

    seen: list[str] = []
    original = psycopg.AsyncCursor.execute

    async def execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        text = query if isinstance(query, str) else str(query)
        seen.append(" ".join(text.split()[:3]))
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)
    return seen


def _psycopg_only(driver: tuple[str, str]) -> None:
    if driver[1] != "postgresql+psycopg":
        pytest.skip("the dedup insert is sent ahead of the flush on psycopg's asyncio driver only")


async def test_the_dedup_insert_is_sent_before_the_flush_and_awaited_after_it(aengine, driver, sent, count_effects):
    """On psycopg's asyncio driver the ids are inserted while the flush prepares the handlers' rows:
    the INSERT of the processed ids reaches the driver before the flush's INSERT of the effects."""
    _psycopg_only(driver)
    c = OrmRecorder()
    batch = [msg(), msg(), msg()]
    out = await c.process_batch(aengine, batch)
    assert [o.status for o in out] == [Status.PROCESSED] * 3
    inserts = [s for s in sent if s.startswith("INSERT INTO")]
    assert inserts == [f"INSERT INTO {T.processed.name}", f"INSERT INTO {EFFECTS.name}"], sent
    assert all(count_effects(m.id) == 1 for m in batch)
    again = await c.process_batch(aengine, [msg(m.id) for m in batch])
    assert [(o.status, o.result) for o in again] == [(Status.DUPLICATE, {"seen": m.id}) for m in batch]


async def test_a_concurrent_id_fails_the_insert_sent_ahead_and_the_batch_is_redone(
        aengine, driver, engine, sent, count_effects):
    """The insert sent ahead of the flush hits an id a sync consumer committed while the async
    handlers ran; the flush then fails in the aborted transaction, and it is the insert's unique
    violation that has the batch redone inserting first: a duplicate with the other's result, one
    effect each."""
    _psycopg_only(driver)
    racing, rest, third = msg(), msg(), msg()
    a, other_out = _raced(OrmRecorder, engine, racing.id)
    out = await a.process_batch(aengine, [racing, rest, third])
    assert [o.status for o in other_out[0]] == [Status.PROCESSED]  # type: ignore[index]
    assert [o.status for o in out] == [Status.DUPLICATE, Status.PROCESSED, Status.PROCESSED]
    assert out[0].result == {"by": "other"}
    assert sent.index(f"INSERT INTO {T.processed.name}") < sent.index(f"INSERT INTO {EFFECTS.name}")
    assert a.calls.count(rest.id) == 2  # once in the attempt that rolled back, once in the redo
    assert count_effects(racing.id) == 1 and count_effects(rest.id) == 1 and count_effects(third.id) == 1


async def test_a_statement_listener_sees_the_dedup_insert_after_the_flush(aengine, driver, sent):
    """With a ``before_cursor_execute`` listener (OpenTelemetry's SQLAlchemy instrumentation, SQL
    logging) the insert goes through ``Connection.execute`` after the flush, where the listener sees it."""
    _psycopg_only(driver)
    seen: list[str] = []

    def note(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(" ".join(statement.split()[:3]))

    sa.event.listen(aengine.sync_engine, "before_cursor_execute", note)
    out = await OrmRecorder().process_batch(aengine, [msg(), msg()])
    assert [o.status for o in out] == [Status.PROCESSED] * 2
    want = [f"INSERT INTO {EFFECTS.name}", f"INSERT INTO {T.processed.name}"]
    assert [s for s in seen if s.startswith("INSERT INTO")] == want
    assert [s for s in sent if s.startswith("INSERT INTO")] == want


async def test_a_result_that_cannot_be_stored_fails_its_message_only_under_asyncio(aengine, count_effects):
    """As the sync consumer: an ``object()`` result is its message's failure, retried; the others pass."""
    bad, good = msg(), [msg(), msg(), msg()]

    class Bad(AsyncRecorder):
        async def handle(self, session, message):
            result = await super().handle(session, message)
            return object() if message.id == bad.id else result

    out = await Bad().process_batch(aengine, [good[0], bad, *good[1:]])
    assert [o.status for o in out] == [Status.PROCESSED, Status.RETRY, Status.PROCESSED, Status.PROCESSED]
    assert count_effects(bad.id) == 0 and all(count_effects(m.id) == 1 for m in good)


# ------------------------------------------------------------------ the stored ids read in parts (psycopg)
class Echo(AsyncRecorder):
    """Stores the payload's ``r`` as the result (any JSON value, ``None`` included); an ORM effect row."""

    async def handle(self, session, message):
        self.calls.append(message.id)
        session.add(_Effect(message.id, str(message.body)))
        if message.id in self.failing:
            raise RuntimeError(f"handler failed for {message.id}")
        return message.body["r"]


def _r(value: object) -> IncomingMessage:
    import json

    return msg(payload=json.dumps({"r": value}).encode())


#: results of every JSON kind, non-ASCII text among them
RESULTS = [{"a": [1, 2.5, None]}, [1, "two"], "h\u00e9llo \u2603", 7, True, None]


async def test_a_batch_read_in_parts_finds_every_stored_id_and_runs_each_new_one_once(aengine, count_effects):
    """400 messages, more than one read part (consumers.base._read_parts): ids stored earlier sit in
    every part and come back DUPLICATE with their results as stored; a second copy in a later part of
    an id first seen in an earlier part is a duplicate of it; every new id is handled once, in message
    order."""
    c = Echo()
    stored = [_r(v) for v in RESULTS] * 1
    assert [o.status for o in await c.process_batch(aengine, stored)] == [Status.PROCESSED] * len(stored)
    c.calls.clear()
    batch = [_r(i) for i in range(400)]
    for pos, m in zip((3, 140, 150, 290, 300, 399), stored, strict=True):
        batch[pos] = msg(m.id, payload=m.payload)
    batch[350] = msg(batch[20].id, payload=batch[20].payload)  # first copy in the first part, second in the last
    out = await c.process_batch(aengine, batch)
    dup_at = {3: RESULTS[0], 140: RESULTS[1], 150: RESULTS[2], 290: RESULTS[3], 300: RESULTS[4], 399: RESULTS[5],
              350: 20}
    assert [(i, o.status, o.result) for i, o in enumerate(out) if o.status is not Status.PROCESSED] == [
        (i, Status.DUPLICATE, r) for i, r in sorted(dup_at.items())]
    assert [o.result for i, o in enumerate(out) if i not in dup_at] == [i for i in range(400) if i not in dup_at]
    assert c.calls == [m.id for i, m in enumerate(batch) if i not in dup_at]
    assert all(count_effects(m.id) == 1 for m in batch)


async def test_later_parts_are_read_while_the_earlier_parts_handlers_run(aengine, driver, monkeypatch):
    """On psycopg's asyncio driver a part's read goes out before the handlers of the part before it:
    the second read reaches the driver before the first handler runs, the third before the second
    part's first handler, and after the first part's last handler started (3 parts of 134, 133, 133)."""
    _psycopg_only(driver)
    import psycopg

    events: list[str] = []
    original = psycopg.AsyncCursor.execute

    async def execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        text = query if isinstance(query, str) else str(query)
        if text.startswith("SELECT") and T.processed.name in text:
            events.append("read")
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", execute)

    class Marking(Echo):
        async def handle(self, session, message):
            events.append(f"handle {message.body['r']}")
            return await super().handle(session, message)

    out = await Marking().process_batch(aengine, [_r(i) for i in range(400)])
    assert [o.status for o in out] == [Status.PROCESSED] * 400
    reads = [i for i, e in enumerate(events) if e == "read"]
    assert len(reads) == 3, events[:3]
    at = {n: events.index(f"handle {n}") for n in (0, 133, 134, 266, 267)}
    assert reads[0] < reads[1] < at[0] < at[133] < reads[2] < at[134] < at[266] < at[267]


async def test_a_handler_failing_while_the_next_part_is_read_redoes_the_batch(aengine, count_effects):
    """A handler of the first part fails while the second part's read is under way: the read is let
    finish, the batch is redone with savepoints, only the failing message is retried, and the
    connection is fine for the next batch."""
    c = Echo()
    batch = [_r(i) for i in range(400)]
    c.failing.add(batch[10].id)
    out = await c.process_batch(aengine, batch)
    assert [i for i, o in enumerate(out) if o.status is Status.RETRY] == [10]
    assert all(o.status is Status.PROCESSED for i, o in enumerate(out) if i != 10)
    assert count_effects(batch[10].id) == 0 and all(count_effects(m.id) == 1 for i, m in enumerate(batch) if i != 10)
    c.failing.clear()
    again = await c.process_batch(aengine, [msg(m.id, payload=m.payload) for m in batch[:300]] + [_r("new")])
    assert [o.status for o in again] == [Status.DUPLICATE] * 10 + [Status.PROCESSED] + [Status.DUPLICATE] * 289 + [
        Status.PROCESSED]
