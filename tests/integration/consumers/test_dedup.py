"""The dedup algorithm on PostgreSQL, MariaDB and SQLite."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from consumers import (
    DedupConsumer,
    IncomingMessage,
    Status,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    requeue_dead_letters,
)
from outbox.schema import default_tables
from tests.integration.consumers.conftest import EFFECTS

T = default_tables()


def dedup_rows(engine: sa.Engine, consumer: str = "test.recorder") -> dict[str, object]:
    with engine.connect() as c:
        rows = c.execute(sa.select(T.processed.c.message_id, T.processed.c.result)
                         .where(T.processed.c.consumer == consumer)).all()
    return {r[0]: r[1] for r in rows}


@pytest.mark.parametrize("savepoints", ["on-failure", "always"])
def test_three_deliveries_one_effect(engine, effects, count_effects, make_message, recorder_cls, savepoints):
    consumer = recorder_cls(savepoints=savepoints)
    msgs = [make_message(payload=f'{{"n": {i}}}'.encode()) for i in range(5)]
    first = consumer.process_batch(engine, msgs)
    assert [o.status for o in first] == [Status.PROCESSED] * 5
    assert [o.result for o in first] == [{"seen": m.id, "n": i} for i, m in enumerate(msgs)]
    # redelivered twice more: once as a batch, once with every message twice in the same batch
    copies = [IncomingMessage(id=m.id, topic=m.topic, key=m.key, payload=m.payload, content_type=m.content_type)
              for m in msgs]
    second = consumer.process_batch(engine, copies)
    third = consumer.process_batch(engine, copies + copies)
    assert {o.status for o in second + third} == {Status.DUPLICATE}
    assert [o.result for o in second] == [o.result for o in first]  # the stored result comes back
    assert count_effects() == 5
    for m in msgs:
        assert count_effects(m.id) == 1
    assert len(consumer.calls) == 5
    assert set(dedup_rows(engine)) == {m.id for m in msgs}


def test_same_id_twice_in_one_batch(engine, effects, count_effects, make_message, recorder_cls):
    consumer = recorder_cls()
    m = make_message()
    out = consumer.process_batch(engine, [m, make_message(m.id)])
    assert [o.status for o in out] == [Status.PROCESSED, Status.DUPLICATE]
    assert count_effects() == 1


def test_consumers_are_independent(engine, effects, count_effects, make_message, recorder_cls):
    a, b = recorder_cls(), recorder_cls(name="test.other")
    m = make_message()
    assert a.process_batch(engine, [m])[0].status is Status.PROCESSED
    assert b.process_batch(engine, [make_message(m.id)])[0].status is Status.PROCESSED
    assert count_effects(m.id) == 2


def test_failing_handler_rolls_back_only_itself(engine, effects, count_effects, make_message, recorder_cls):
    consumer = recorder_cls()
    msgs = [make_message() for _ in range(4)]
    consumer.failing = {msgs[1].id}
    out = consumer.process_batch(engine, msgs)
    assert [o.status for o in out] == [Status.PROCESSED, Status.RETRY, Status.PROCESSED, Status.PROCESSED]
    assert out[1].retry_in is not None and out[1].retry_in >= 0
    assert count_effects(msgs[1].id) == 0  # its effect rolled back ...
    assert msgs[1].id not in dedup_rows(engine)  # ... and its dedup row too
    assert {msgs[0].id, msgs[2].id, msgs[3].id} <= set(dedup_rows(engine))
    assert count_effects() == 3


def test_retry_then_dead_letter_then_requeue(engine, effects, count_effects, make_message, recorder_cls):
    consumer = recorder_cls()
    good, bad = make_message(), make_message(key="bad-key")
    consumer.failing = {bad.id}
    waits: list[float] = []
    out = consumer.process(engine, [good, bad], sleep=waits.append)
    assert [o.status for o in out] == [Status.PROCESSED, Status.DEAD]
    assert len(waits) == consumer.max_attempts - 1  # retried with backoff, then given up
    assert count_effects(bad.id) == 0 and count_effects(good.id) == 1
    [dead] = list_dead_letters(engine, consumer=consumer.name)
    assert dead["message_id"] == bad.id and dead["attempts"] == consumer.max_attempts
    assert "handler failed" in dead["error"] and dead["status"] == "dead"
    assert dead["topic"] == "orders" and dead["key"] == "bad-key"
    full = get_dead_letter(engine, dead["id"])
    assert full is not None and full["payload"] == bad.payload and "RuntimeError" in full["traceback"]
    assert full["first_failed_at"] <= full["last_failed_at"]
    assert list_dead_letters(engine, consumer="someone.else") == []
    assert list_dead_letters(engine, consumer=consumer.name, older_than=dt.timedelta(hours=1)) == []

    # still broken: a requeue puts the row back to dead with the new error
    assert requeue_dead_letters(engine, consumer=consumer.name) == 1
    assert [o.status for o in consumer.process_requeued(engine)] == [Status.DEAD]
    again = get_dead_letter(engine, dead["id"])
    assert again is not None and again["status"] == "dead" and again["attempts"] == consumer.max_attempts + 1

    # fixed: requeue -> processed exactly once, row resolved; a second requeue is a no-op
    consumer.failing = set()
    assert requeue_dead_letters(engine, consumer=consumer.name, ids=[dead["id"]]) == 1
    assert [o.status for o in consumer.process_requeued(engine)] == [Status.PROCESSED]
    assert count_effects(bad.id) == 1
    assert get_dead_letter(engine, dead["id"])["status"] == "resolved"  # type: ignore[index]
    assert consumer.process_requeued(engine) == []
    assert requeue_dead_letters(engine, consumer=consumer.name) == 0  # resolved rows are not requeued


def test_requeue_of_a_processed_message_is_a_noop(engine, effects, count_effects, make_message, recorder_cls):
    consumer = recorder_cls()
    m = make_message()
    consumer.process_batch(engine, [m])
    # the same message was dead-lettered by another path (e.g. a redelivery that failed elsewhere)
    with engine.begin() as c:
        now = dt.datetime.now(dt.timezone.utc)
        c.execute(T.dead_letters.insert().values(consumer=consumer.name, message_id=m.id, topic="orders",
                                                 payload=m.payload, error="x", attempts=1, first_failed_at=now,
                                                 last_failed_at=now, status="requeued",
                                                 content_type="application/json"))
    out = consumer.process_requeued(engine)
    assert [o.status for o in out] == [Status.DUPLICATE]
    assert count_effects(m.id) == 1
    assert list_dead_letters(engine, consumer=consumer.name)[0]["status"] == "resolved"
    assert purge_dead_letters(engine, consumer=consumer.name, status="resolved") == 1
    assert list_dead_letters(engine) == []


def test_decode_error_is_not_retried(engine, effects, count_effects, make_message, recorder_cls):
    consumer = recorder_cls()
    m = make_message(payload=b"{not json")
    out = consumer.process(engine, [m], sleep=lambda s: pytest.fail("a decode error must not be retried"))
    assert out[0].status is Status.DEAD
    [dead] = list_dead_letters(engine)
    assert dead["error"].startswith("DecodeError") and dead["attempts"] == 1


def test_no_message_id_goes_to_dead_letters(engine, effects, count_effects, make_message, recorder_cls):
    consumer = recorder_cls()
    ok, anonymous = make_message(), make_message(None)
    out = consumer.process_batch(engine, [ok, anonymous])
    assert [o.status for o in out] == [Status.PROCESSED, Status.DEAD]
    assert consumer.calls == [ok.id]  # never processed without dedup
    [dead] = list_dead_letters(engine)
    assert "no message id" in dead["error"] and dead["message_id"] is None
    assert get_dead_letter(engine, dead["id"])["payload"] == anonymous.payload  # type: ignore[index]


def test_content_hash_ids(engine, effects, count_effects, make_message, recorder_cls):
    consumer = recorder_cls(id_strategy="content-hash")
    same = [make_message(None, b'{"n": 7}') for _ in range(3)]
    other_key = make_message(None, b'{"n": 7}', key="other")
    out = consumer.process_batch(engine, [*same, other_key])
    assert [o.status for o in out] == [Status.PROCESSED, Status.DUPLICATE, Status.DUPLICATE, Status.PROCESSED]
    assert count_effects() == 2
    assert len(same[0].id) == 64 and same[0].id == same[1].id != other_key.id  # type: ignore[arg-type]


def test_custom_id_extractor(engine, effects, count_effects, make_message):
    class ByHeader(DedupConsumer):
        name = "test.by-header"
        message_id = staticmethod(lambda m: m.headers.get("event-id"))

        def handle(self, session, message):
            session.execute(sa.text("INSERT INTO test_consumer_effects (message_id) VALUES (:m)"), {"m": message.id})

    consumer = ByHeader()
    a, b, c = make_message(), make_message(), make_message()
    a.headers["event-id"] = b.headers["event-id"] = "evt-1"
    out = consumer.process_batch(engine, [a, b, c])
    assert [o.status for o in out] == [Status.PROCESSED, Status.DUPLICATE, Status.DEAD]
    assert count_effects("evt-1") == 1 and count_effects() == 1


def test_an_id_extractor_that_raises_dead_letters_that_message_only(engine, effects, count_effects, make_message,
                                                                     recorder_cls):
    """A user's message_id callable failing on one message (a missing header, bad JSON) is that
    message's problem: it goes to the dead letters with the error, the rest of the batch is processed."""
    def by_body(m):
        return m.body["event"]  # KeyError for a message without it

    consumer = recorder_cls(message_id=by_body)
    good, bad = make_message(payload=b'{"event": "e-1"}'), make_message()
    after = make_message(payload=b'{"event": "e-2"}')
    out = consumer.process_batch(engine, [good, bad, after])
    assert [o.status for o in out] == [Status.PROCESSED, Status.DEAD, Status.PROCESSED]
    assert count_effects() == 2
    [dead] = list_dead_letters(engine)
    assert "the message_id extractor raised KeyError: 'event'" in dead["error"], dead["error"]


def test_lane_holds_later_messages_of_the_same_partition(engine, effects, count_effects, make_message,
                                                         recorder_cls):
    consumer = recorder_cls()
    p0 = [make_message(partition=0, offset=i, broker="kafka") for i in range(3)]
    p1 = [make_message(partition=1, offset=i, broker="kafka") for i in range(2)]
    consumer.failing = {p0[1].id}
    out = consumer.process_batch(engine, [p0[0], p1[0], p0[1], p1[1], p0[2]])
    assert [o.status for o in out] == [Status.PROCESSED, Status.PROCESSED, Status.RETRY, Status.PROCESSED,
                                       Status.SKIPPED]
    assert count_effects() == 3


def test_duplicates_leave_no_orm_state_behind(engine, effects, count_effects, make_message):
    """A handler using the ORM: a failure in flush is attributed to its message."""

    class FlushFails(DedupConsumer):
        name = "test.flush"
        max_attempts = 1

        def handle(self, session, message):
            # duplicate primary key -> IntegrityError at flush, only for the message "dup"
            session.execute(EFFECTS_PK.insert().values(id=1 if message.body["n"] == 0 else message.body["n"]))

    EFFECTS_PK.create(engine, checkfirst=True)
    with engine.begin() as c:
        c.execute(EFFECTS_PK.delete())
    try:
        consumer = FlushFails()
        out = consumer.process_batch(engine, [make_message(payload=b'{"n": 1}'), make_message(payload=b'{"n": 0}'),
                                              make_message(payload=b'{"n": 2}')])
        assert [o.status for o in out] == [Status.PROCESSED, Status.DEAD, Status.PROCESSED]
        with engine.connect() as c:
            assert sorted(c.execute(sa.select(EFFECTS_PK.c.id)).scalars()) == [1, 2]
    finally:
        with engine.begin() as c:
            c.execute(EFFECTS_PK.delete())


EFFECTS_PK = sa.Table("test_consumer_pk", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True,
                                                                    autoincrement=False))


class _Statements:
    """The SQL statements ``engine`` sends while the block runs."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.seen: list[str] = []

    def _on(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.seen.append(statement)

    def __enter__(self) -> list[str]:
        sa.event.listen(self.engine, "before_cursor_execute", self._on)
        return self.seen

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._on)


def test_duplicates_get_their_stored_results_in_the_dedup_round_trip(engine, effects, count_effects, make_message,
                                                                     recorder_cls):
    """A batch of new ids and duplicates reads the duplicates' stored results with the read of the
    ids seen before, and inserts the new ids with their results at the end (on PostgreSQL two
    statements on the processed table in all: one SELECT, one INSERT, no UPDATE of the results); a
    second copy of a new id in the same batch gets the result of the first copy as stored."""
    consumer = recorder_cls()
    old = [make_message(payload=f'{{"n": {i}}}'.encode()) for i in range(3)]
    first = consumer.process_batch(engine, old)
    fresh = [make_message(payload=f'{{"n": {i}}}'.encode()) for i in range(10, 13)]
    copies = [make_message(m.id, payload=m.payload) for m in old]
    with _Statements(engine) as seen:
        out = consumer.process_batch(engine, [fresh[0], copies[0], fresh[1], copies[1], fresh[2], copies[2]])
    assert [o.status for o in out] == [Status.PROCESSED, Status.DUPLICATE] * 3
    assert [o.result for o in out[1::2]] == [o.result for o in first]
    processed = T.processed.name
    dedup_statements = [s.lstrip().split(None, 1)[0].upper() for s in seen if processed in s]
    if engine.dialect.name == "postgresql":
        assert dedup_statements == ["SELECT", "INSERT"], seen
    assert count_effects() == 6

    again = make_message(payload=b'{"n": 20}')
    twice = consumer.process_batch(engine, [again, make_message(again.id, payload=again.payload),
                                            make_message(old[0].id, payload=old[0].payload)])
    assert [o.status for o in twice] == [Status.PROCESSED, Status.DUPLICATE, Status.DUPLICATE]
    assert twice[1].result == twice[0].result == {"seen": again.id, "n": 20}
    assert twice[2].result == first[0].result


def test_a_batch_stores_its_results_in_one_statement_as_the_engines_serializer_writes_them(
        engine, effects, make_message):
    """PostgreSQL: the results of a batch are stored with the ids by the one INSERT at the end of the
    batch (no UPDATE; one UPDATE per message cost 9.3 ms a batch of 450), through the engine's own
    ``json_serializer``; every dialect stores each result as it was returned, and hands it back for
    a duplicate."""
    import decimal
    import json

    class Priced(DedupConsumer):
        name = "test.priced"

        def handle(self, session, message):
            n = message.body["n"]
            return {"n": n, "price": decimal.Decimal(f"{n}.50"), "tags": ["a", None], "id": message.id}

    own = sa.create_engine(engine.url, json_serializer=lambda o: json.dumps(o, default=str))
    try:
        msgs = [make_message(payload=f'{{"n": {i}}}'.encode()) for i in range(5)]
        calls: list[tuple[str, bool]] = []

        def on(conn, cursor, statement, parameters, context, executemany) -> None:
            calls.append((statement, executemany))

        sa.event.listen(own, "before_cursor_execute", on)
        out = Priced().process_batch(own, msgs)
        sa.event.remove(own, "before_cursor_execute", on)
        assert [o.status for o in out] == [Status.PROCESSED] * 5
        want = [{"n": i, "price": f"{i}.50", "tags": ["a", None], "id": m.id} for i, m in enumerate(msgs)]
        writes = [(st.lstrip().split(None, 1)[0].upper(), many) for st, many in calls
                  if T.processed.name in st and not st.lstrip().upper().startswith("SELECT")]
        if engine.dialect.name == "postgresql":
            assert writes == [("INSERT", False)], calls
        again = Priced().process_batch(own, [make_message(m.id, payload=m.payload) for m in msgs])
        assert [o.status for o in again] == [Status.DUPLICATE] * 5
        assert [o.result for o in again] == want
    finally:
        own.dispose()


def test_no_statement_of_the_dedup_path_gives_the_keys_a_collation(engine, effects, make_message, recorder_cls):
    """The key columns sort with COLLATE "C" on PostgreSQL since 0006, and an array cast of the
    column type would render it on the parameter: an explicit collation then wins over the column's,
    and on a database not yet at 0006 the primary key cannot serve the look-up (a sequential scan per
    key, 15 ms each at 190,000 rows). The fast path, its stored-result reads and the savepoint
    redo send no COLLATE."""
    consumer = recorder_cls()
    old = [make_message(payload=f'{{"n": {i}}}'.encode()) for i in range(3)]
    consumer.process_batch(engine, old)
    again = [make_message(m.id, payload=m.payload) for m in old]
    fresh = make_message()
    with _Statements(engine) as seen:
        out = consumer.process_batch(engine, [*again, fresh, make_message(fresh.id, payload=fresh.payload)])
        assert [o.status for o in out] == [Status.DUPLICATE] * 3 + [Status.PROCESSED, Status.DUPLICATE]
        failing = make_message()
        consumer.failing.add(failing.id)
        out = consumer.process_batch(engine, [make_message(old[0].id, payload=old[0].payload), failing])
        assert [o.status for o in out] == [Status.DUPLICATE, Status.RETRY]
    assert seen and not [st for st in seen if "COLLATE" in st.upper()]


def test_a_key_committed_concurrently_during_the_dedup_statement_is_read_after_it(engine):
    """PostgreSQL: the one-statement insert-and-read cannot see a row another transaction commits
    while the statement waits on its conflict check; that key is read again, so its stored result
    is not lost."""
    if engine.dialect.name != "postgresql":
        pytest.skip("the one-statement insert-and-read is PostgreSQL's")
    import threading
    import time
    import uuid

    from outbox.dialects import dialect_for

    d = dialect_for(engine)
    t = T.processed
    name = f"test.concurrent.{uuid.uuid4().hex[:8]}"
    now = dt.datetime.now(dt.timezone.utc)
    racing, other = str(uuid.uuid4()), str(uuid.uuid4())
    got: dict[str, object] = {}
    with engine.connect() as first:
        first.execute(t.insert().values(consumer=name, message_id=racing, processed_at=now, result={"by": "first"}))
        pid: list[int] = []

        def second() -> None:
            with engine.begin() as conn:
                pid.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
                got["out"] = d.insert_new_keys_reading(conn, t, "message_id", [racing, other],
                                                       {"consumer": name, "processed_at": now}, "result")

        th = threading.Thread(target=second)
        th.start()
        deadline = time.monotonic() + 20
        with engine.connect() as watch:  # wait until the second transaction waits on the first's row
            while time.monotonic() < deadline:
                if pid and watch.execute(sa.text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"),
                                         {"p": pid[0]}).scalar() == "Lock":
                    break
                watch.rollback()
            else:
                pytest.fail("the second transaction never waited for the first")
        first.commit()
        th.join(20)
    new, existing = got["out"]  # type: ignore[misc]
    assert new == {other}
    assert existing == {racing: {"by": "first"}}


def test_an_id_a_concurrent_consumer_commits_after_the_read_rolls_the_batch_back_and_redoes_it(
        engine, effects, count_effects, make_message, recorder_cls):
    """Two real transactions on the same id. Consumer A reads its batch's ids (none stored yet) and,
    while its handler for the racing message runs, consumer B (another connection, same consumer
    name) processes that message and commits. A's insert of the new ids at the end of the batch then
    hits the unique key: A's whole transaction rolls back, its handlers' effects with it, and the
    batch is redone inserting the ids first, where the racing id is a duplicate with B's stored
    result. Every id has exactly one effect."""
    import threading

    from outbox.dialects import dialect_for

    with engine.connect() as conn:
        if not dialect_for(engine).inserts_keys_at_end(conn, T.processed):
            pytest.skip("this dialect inserts the ids first (no read first)")
    racing = make_message(payload=b'{"n": 7}')
    others = [make_message(payload=f'{{"n": {i}}}'.encode()) for i in range(3)]
    b_consumer = recorder_cls()
    b_out: list[object] = []

    class A(recorder_cls):  # type: ignore[misc, valid-type]
        def handle(self, session, message):
            result = super().handle(session, message)
            if message.id == racing.id and not b_out:  # the first try only: B commits the same id meanwhile
                th = threading.Thread(target=lambda: b_out.append(
                    b_consumer.process_batch(engine, [make_message(racing.id, payload=racing.payload)])))
                th.start()
                th.join(60)
                assert not th.is_alive(), "consumer B did not finish"
            return result

    a = A()
    out = a.process_batch(engine, [others[0], racing, *others[1:]])
    (b_outcome,) = b_out[0]  # type: ignore[index]
    assert b_outcome.status is Status.PROCESSED and b_consumer.calls == [racing.id]
    assert [o.status for o in out] == [Status.PROCESSED, Status.DUPLICATE, Status.PROCESSED, Status.PROCESSED]
    assert out[1].result == b_outcome.result == {"seen": racing.id, "n": 7}
    # A's first try ran every handler; the redo ran the three others again, not the racing one
    assert sorted(a.calls) == sorted([m.id for m in others] * 2 + [racing.id])
    for m in [racing, *others]:
        assert count_effects(m.id) == 1, m.id
    stored = dedup_rows(engine)
    assert stored[racing.id] == {"seen": racing.id, "n": 7}
    assert [stored[m.id] for m in others] == [{"seen": m.id, "n": i} for i, m in enumerate(others)]


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_the_read_of_stored_ids_and_the_insert_at_the_end_go_in_key_order(engine, effects, make_message,
                                                                          recorder_cls):
    """PostgreSQL: both dedup statements send their ids sorted, so the index descents walk the
    primary key's pages in order (docs/benchmarks.md)."""
    import json

    keys: list[list[str]] = []

    def note(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if T.processed.name in statement and isinstance(parameters, dict):
            if "_keys" in parameters:
                keys.append(json.loads(parameters["_keys"]))
            elif "_rows" in parameters:
                rows = getattr(parameters["_rows"], "obj", parameters["_rows"])  # psycopg's Jsonb wrapper
                keys.append([r["k"] for r in rows])

    msgs = [make_message() for _ in range(20)]
    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        out = recorder_cls().process_batch(engine, msgs)
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    assert [o.status for o in out] == [Status.PROCESSED] * 20
    assert len(keys) == 2, keys  # the read, then the insert at the end
    assert keys[0] == sorted(m.id for m in msgs) == keys[1]


# ------------------------------------------------------------------ the dedup insert sent ahead of the flush (psycopg)
class _SyncEffect:
    """The effects table as an ORM class: a handler's ``session.add`` leaves its row to the flush."""

    def __init__(self, message_id: str, value: str) -> None:
        self.message_id = message_id
        self.value = value


sa.orm.registry().map_imperatively(_SyncEffect, EFFECTS)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The statements psycopg's sync cursors send, in the order they reach the driver (first words)."""
    import threading

    import psycopg

    seen: list[str] = []
    lock = threading.Lock()
    original = psycopg.Cursor.execute

    def execute(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            seen.append(" ".join(str(query).split()[:3]))
        return original(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    return seen


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_the_dedup_insert_goes_out_before_the_flush_on_sync_psycopg(engine, effects, make_message, recorder_cls,
                                                                    sent, count_effects):
    """The sync consumer on psycopg sends the new ids' INSERT from a worker thread before the flush
    of the handlers' rows (the flush waits for it on the connection); results stored, one effect each."""

    class Orm(recorder_cls):  # type: ignore[misc, valid-type]
        def handle(self, session, message):
            self.calls.append(message.id)
            session.add(_SyncEffect(message.id, "orm"))
            return {"seen": message.id}

    batch = [make_message() for _ in range(3)]
    c = Orm()
    out = c.process_batch(engine, batch)
    assert [o.status for o in out] == [Status.PROCESSED] * 3
    inserts = [s for s in sent if s.startswith("INSERT INTO")]
    assert inserts == [f"INSERT INTO {T.processed.name}", f"INSERT INTO {EFFECTS.name}"], sent
    assert all(count_effects(m.id) == 1 for m in batch)
    again = c.process_batch(engine, [make_message(m.id) for m in batch])
    assert [(o.status, o.result) for o in again] == [(Status.DUPLICATE, {"seen": m.id}) for m in batch]


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_a_concurrent_id_fails_the_insert_sent_ahead_of_a_pending_flush_and_the_batch_is_redone(
        engine, effects, make_message, recorder_cls, sent, count_effects):
    """The worker thread's INSERT hits an id another consumer committed while the handlers ran; the
    flush of the pending rows then fails in the aborted transaction, and the insert's unique
    violation has the batch redone inserting first: one effect each, the racing id a duplicate."""

    class Orm(recorder_cls):  # type: ignore[misc, valid-type]
        def handle(self, session, message):
            self.calls.append(message.id)
            session.add(_SyncEffect(message.id, "orm"))
            if message.id == racing.id and not b_out:
                b_out.append(recorder_cls().process_batch(engine, [make_message(racing.id)]))
                sent.clear()  # from here on, A's statements only
            return {"seen": message.id}

    racing, rest, third = make_message(), make_message(), make_message()
    b_out: list[object] = []
    a = Orm()
    out = a.process_batch(engine, [racing, rest, third])
    assert [o.status for o in b_out[0]] == [Status.PROCESSED]  # type: ignore[index]
    assert [o.status for o in out] == [Status.DUPLICATE, Status.PROCESSED, Status.PROCESSED]
    assert sent.index(f"INSERT INTO {T.processed.name}") < sent.index(f"INSERT INTO {EFFECTS.name}")
    assert a.calls.count(rest.id) == 2  # once in the attempt that rolled back, once in the redo
    assert count_effects(racing.id) == 1 and count_effects(rest.id) == 1 and count_effects(third.id) == 1


def test_a_result_that_cannot_be_stored_fails_its_message_only(engine, effects, make_message, recorder_cls,
                                                                count_effects):
    """A handler result the JSON column cannot take (an ``object()``) is that message's failure: it
    is retried (its effects rolled back with it), the others of the batch are processed."""

    class Bad(recorder_cls):  # type: ignore[misc, valid-type]
        def handle(self, session, message):
            result = super().handle(session, message)
            return object() if message.id == bad.id else result

    bad = make_message()
    good = [make_message() for _ in range(3)]
    out = Bad().process_batch(engine, [good[0], bad, *good[1:]])
    assert [o.status for o in out] == [Status.PROCESSED, Status.RETRY, Status.PROCESSED, Status.PROCESSED]
    assert "JSON" in str(out[1].error) or "serializ" in str(out[1].error).lower(), out[1].error
    assert count_effects(bad.id) == 0 and all(count_effects(m.id) == 1 for m in good)


def test_a_batch_of_several_read_parts_finds_every_stored_id(engine, effects, count_effects, make_message,
                                                              recorder_cls):
    """400 messages (several parts of consumers.base._read_parts, read at once where the driver
    cannot overlap them): ids stored earlier, in every part, are DUPLICATE with their stored
    results; a second copy in a later part of an id first seen in the first part is a duplicate of
    it; each new id is handled once, in message order."""
    consumer = recorder_cls()
    stored = [make_message(payload=b'{"n": %d}' % n) for n in range(1000, 1004)]
    assert [o.status for o in consumer.process_batch(engine, stored)] == [Status.PROCESSED] * 4
    consumer.calls.clear()
    batch = [make_message(payload=b'{"n": %d}' % n) for n in range(400)]
    for pos, m in zip((3, 150, 290, 399), stored, strict=True):
        batch[pos] = make_message(m.id, payload=m.payload)
    batch[350] = make_message(batch[20].id, payload=batch[20].payload)
    out = consumer.process_batch(engine, batch)
    dups = {3: 1000, 150: 1001, 290: 1002, 399: 1003, 350: 20}
    assert [(i, o.status, o.result["n"]) for i, o in enumerate(out) if o.status is not Status.PROCESSED] == [
        (i, Status.DUPLICATE, n) for i, n in sorted(dups.items())]
    assert consumer.calls == [m.id for i, m in enumerate(batch) if i not in dups]
    assert count_effects() == 4 + 400 - len(dups)
