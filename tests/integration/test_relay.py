"""The relay on real databases (PostgreSQL, MariaDB, SQLite), publishing to the in-memory broker.

Broker-specific behaviour (Kafka, RabbitMQ) is covered by tests/integration/relay_e2e/ and
the contract suite; here the database side is exercised: claims, ordering, retries, dead rows,
leases, fencing and shutdown.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, SchemaMissing, admin, default_tables
from outbox.brokers.base import Outcome
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay

T = default_tables().outbox
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2,
        "progress_interval": 0, "lease_ttl": 3.0}


def cfg(**kw) -> RelayConfig:
    return RelayConfig(**{**FAST, **kw})


def write(engine: sa.Engine, n: int, keys: int = 10, topic: str = "orders", start: int = 0, **kw) -> list:
    box = Outbox()
    with Session(engine) as s, s.begin():
        return box.add_many(
            s, [OutgoingMessage(topic, {"seq": i, "key": f"k{i % keys}"}, key=f"k{i % keys}", **kw)
                for i in range(start, start + n)]
        )


def seqs_by_key(pub: MemoryPublisher) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for m in pub.snapshot():
        out.setdefault(m.key, []).append(json.loads(m.payload)["seq"])
    return out


@contextlib.contextmanager
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    """Every statement ``engine`` runs inside the block, its whitespace folded."""
    seen: list[str] = []

    def note(conn, cursor, statement, params, context, executemany) -> None:
        seen.append(" ".join(statement.split()))

    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)


def pending_rows(engine: sa.Engine) -> list:
    with engine.connect() as c:
        return c.execute(sa.select(T).order_by(T.c.id)).all()


def test_committed_published_rolled_back_never_and_rows_deleted(engine: sa.Engine, dialect_name: str) -> None:
    ids = write(engine, 50)
    box = Outbox()
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg())
    with Session(engine) as s:
        s.begin()
        box.add(s, "orders", {"seq": -1}, key="open")
        if dialect_name != "sqlite":  # SQLite has one writer: an open write transaction would block the relay
            s.flush()  # the row is in the database but not committed: invisible to the relay
            assert relay.drain() == 50
        s.rollback()
    assert relay.drain() == (0 if dialect_name != "sqlite" else 50)
    relay.close()
    got = pub.snapshot()
    assert [m.message_id for m in got] == ids  # one key per partition is in id order; all here in id order
    assert all(m.headers["message-id"] == str(m.message_id) for m in got)
    assert pending_rows(engine) == []


def test_per_key_order_across_batches(engine: sa.Engine) -> None:
    write(engine, 3000, keys=37)
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg(batch_size=128))
    assert relay.drain() == 3000
    relay.close()
    for key, seqs in seqs_by_key(pub).items():
        assert seqs == sorted(seqs), key
    assert sum(len(v) for v in seqs_by_key(pub).values()) == 3000


def test_retry_backoff_then_delivery_and_strict_order_holds_later_messages(engine: sa.Engine) -> None:
    write(engine, 6, keys=2)  # k0: 0,2,4   k1: 1,3,5
    pub = MemoryPublisher()
    pub.fail(lambda r: json.loads(r.payload)["seq"] == 0, Outcome.RETRY, "leader not available", times=1)
    relay = Relay(engine, pub, config=cfg(batch_size=1, backoff_initial=30, backoff_max=30))
    relay.drain()
    # seq 0 failed and waits 15-30 s; k0's later messages are held back, k1 flows
    assert seqs_by_key(pub) == {"k1": [1, 3, 5]}
    row = pending_rows(engine)[0]
    assert row.attempts == 1 and "leader not available" in row.last_error
    with engine.begin() as c:  # let the backoff run out
        c.execute(T.update().values(available_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    relay.drain()
    relay.close()
    assert seqs_by_key(pub) == {"k1": [1, 3, 5], "k0": [0, 2, 4]}


def test_ordering_none_lets_later_messages_pass(engine: sa.Engine) -> None:
    write(engine, 4, keys=1)
    pub = MemoryPublisher()
    pub.fail(lambda r: json.loads(r.payload)["seq"] == 0, Outcome.RETRY, "timeout", times=1)
    relay = Relay(engine, pub, config=cfg(batch_size=1, ordering="none", backoff_initial=30, backoff_max=30))
    relay.drain()
    relay.close()
    assert seqs_by_key(pub) == {"k0": [1, 2, 3]}


def test_permanent_failure_is_dead_with_reason_others_flow_and_requeue_delivers(engine: sa.Engine) -> None:
    write(engine, 20, keys=4)
    pub = MemoryPublisher()
    rule = pub.fail(lambda r: json.loads(r.payload)["seq"] == 5, Outcome.FAILED, "MSG_SIZE_TOO_LARGE: too big")
    relay = Relay(engine, pub, config=cfg())
    relay.drain()
    dead = admin.list_dead(engine)
    assert len(dead) == 1 and "MSG_SIZE_TOO_LARGE" in dead[0]["last_error"]
    # strict: k1's messages after the dead one are held; the other keys all went out
    got = seqs_by_key(pub)
    assert got["k1"] == [1] and len(got["k0"]) == len(got["k2"]) == len(got["k3"]) == 5
    assert admin.outbox_status(engine)["dead"] == 1
    pub.clear_failures()
    del rule
    assert admin.requeue_dead(engine, key="k1") == 1
    relay.drain()
    relay.close()
    assert seqs_by_key(pub)["k1"] == [1, 5, 9, 13, 17]
    assert pending_rows(engine) == []


def test_retries_exhausted_become_dead(engine: sa.Engine) -> None:
    write(engine, 1)
    pub = MemoryPublisher()
    pub.fail(lambda r: True, Outcome.RETRY, "broker timeout")
    relay = Relay(engine, pub, config=cfg(max_attempts=3, backoff_initial=0.01, backoff_max=0.01))
    for _ in range(50):
        relay.drain()
        if pending_rows(engine)[0].status == "dead":
            break
        with engine.begin() as c:
            c.execute(T.update().values(available_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    relay.close()
    row = pending_rows(engine)[0]
    assert row.status == "dead" and row.attempts == 3
    assert "gave up after 3 attempts: broker timeout" in row.last_error


def test_delayed_messages_wait_for_their_time(engine: sa.Engine) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add(s, "t", b"later", delay=dt.timedelta(hours=1))
        box.add(s, "t", b"now")
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg())
    relay.drain()
    assert [m.payload for m in pub.snapshot()] == [b"now"]
    with engine.begin() as c:  # an hour passes
        c.execute(T.update().values(available_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    relay.drain()
    relay.close()
    assert [m.payload for m in pub.snapshot()] == [b"now", b"later"]


def test_audit_mode_keeps_published_rows(engine: sa.Engine) -> None:
    write(engine, 5)
    relay = Relay(engine, MemoryPublisher(), config=cfg(delete_published=False))
    assert relay.drain() == 5
    relay.close()
    rows = pending_rows(engine)
    assert {r.status for r in rows} == {"published"} and all(r.published_at for r in rows)
    assert admin.outbox_status(engine)["pending"] == 0


def test_broker_unavailable_is_retried_not_fatal(engine: sa.Engine) -> None:
    write(engine, 10)
    pub = MemoryPublisher()
    pub.unavailable = True
    relay = Relay(engine, pub, config=cfg())
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        deadline_ok = True
        for _ in range(200):  # wait until the relay has failed at least twice
            if relay.stats.errors >= 2:
                break
            threading.Event().wait(0.02)
        assert relay.stats.errors >= 2 and t.is_alive()
        pub.unavailable = False
        assert pub.wait_for(10, timeout=30), deadline_ok
    finally:
        relay.stop()
        t.join(30)
    assert not t.is_alive()
    assert pending_rows(engine) == []


def test_missing_tables_name_the_fix(fresh_database: str) -> None:
    eng = sa.create_engine(fresh_database)
    with pytest.raises(SchemaMissing, match="outbox db upgrade"):
        Relay(eng, MemoryPublisher(), config=cfg()).start()
    eng.dispose()


@pytest.mark.parametrize("dialect_name", ["sqlite"], indirect=True)
def test_sqlite_second_relay_waits_as_a_standby_until_the_first_leaves(engine: sa.Engine, caplog) -> None:
    a = Relay(engine, MemoryPublisher(), config=cfg())
    a.start()
    b = Relay(engine, MemoryPublisher(), config=cfg())
    t = threading.Thread(target=b.start, daemon=True)
    with caplog.at_level("WARNING", logger="outbox.relay"):
        t.start()
        deadline = time.monotonic() + 2 * a.config.lease_ttl  # longer than a lease: a keeps renewing
        while time.monotonic() < deadline:
            a.leases.register()
            a.leases.rebalance()
            assert not b.leases.joined and not b.leases.held, "a second SQLite relay must not run next to a live one"
            time.sleep(0.2)
        assert "standby" in caplog.text and a.relay_id in caplog.text
        a.close()  # once the first one left, the standby takes over
        t.join(30)
    assert not t.is_alive() and b.leases.joined
    assert len(b.leases.held) == 32
    b.close()


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"], indirect=True)
def test_relays_share_partitions_fairly_and_never_overlap(engine: sa.Engine) -> None:
    relays = [Relay(engine, MemoryPublisher(), config=cfg(relay_id=f"r{i}")) for i in range(3)]
    for r in relays:
        r.start()
    for _ in range(3):  # a few renewal rounds converge on the fair share
        for r in relays:
            r.leases.register()
            r.leases.rebalance()
    held = [set(r.leases.held) for r in relays]
    assert sorted(len(h) for h in held) == [10, 11, 11]
    assert set().union(*held) == set(range(32))
    assert sum(len(h) for h in held) == 32
    relays[0].close()  # leaving hands its partitions over
    for _ in range(2):
        for r in relays[1:]:
            r.leases.register()
            r.leases.rebalance()
    assert sorted(len(r.leases.held) for r in relays[1:]) == [16, 16]
    for r in relays[1:]:
        r.close()


def test_renewing_the_leases_costs_a_few_statements_whatever_the_partition_count(engine: sa.Engine) -> None:
    """Renewal runs between two rounds and holds the next claim up: it must not cost a statement per
    held partition (32 UPDATEs here, a 26-54 ms stall every renew interval measured under load,
    the top of the relay-added p99 latency). A lease taken meanwhile is still noticed as lost."""
    relay = Relay(engine, MemoryPublisher(), config=cfg(relay_id="solo"))
    relay.start()
    assert len(relay.leases.held) == 32
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    own = relay.leases.engine  # the relay's private copy of the pool (its sessions' idle bound)
    sa.event.listen(own, "before_cursor_execute", count)
    try:
        relay.leases.rebalance()
    finally:
        sa.event.remove(own, "before_cursor_execute", count)
    assert len(relay.leases.held) == 32
    assert len(statements) <= 3, statements
    le = default_tables().leases
    with engine.begin() as c:  # another relay took partition 5 (a new generation) meanwhile
        c.execute(le.update().where(le.c.partition == 5).values(owner="other", generation=le.c.generation + 1))
    relay.leases.rebalance()
    assert 5 not in relay.leases.held
    with engine.connect() as c:
        assert c.execute(sa.select(le.c.owner).where(le.c.partition == 5)).scalar_one() == "other"
    relay.close()


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"], indirect=True)
def test_no_takeover_during_a_batch_and_a_relay_whose_lease_lapsed_claims_nothing(engine: sa.Engine) -> None:
    """A relay's leases are locked for the whole claim-publish-mark transaction, so a relay that
    stalls mid-batch past its lease TTL cannot be overtaken; once its leases are taken over, its
    next round claims nothing (issue 9, item 3)."""
    write(engine, 10, keys=1)
    slow_pub, new_pub = MemoryPublisher(), MemoryPublisher()
    old = Relay(engine, slow_pub, config=cfg(relay_id="old", lease_ttl=1.0))
    old.start()
    new = Relay(engine, new_pub, config=cfg(relay_id="new"))
    le, relays = default_tables().leases, default_tables().relays

    def lapse_old() -> None:  # old stops renewing: its relay row goes, its leases run out (1 s)
        with engine.begin() as c:
            c.execute(relays.delete().where(relays.c.relay_id == "old"))

        def expired() -> bool:
            with engine.connect() as c:
                latest = c.execute(sa.select(sa.func.max(le.c.expires_at)).where(le.c.owner == "old")).scalar()
            return latest is None or latest < dt.datetime.now(dt.timezone.utc)

        deadline = time.monotonic() + 30
        while not expired():
            assert time.monotonic() < deadline, "old's leases never expired"
            time.sleep(0.05)

    taken_during_batch: list[int] = []

    def takeover() -> None:  # while `old` publishes, its leases lapse and `new` tries to take over
        lapse_old()
        new.start()
        taken_during_batch.extend(new.leases.held)

    orig = slow_pub.publish

    def publish_with_takeover(records, *, timeout=30.0):
        t = threading.Thread(target=takeover)  # another connection: old's transaction is still open
        t.start()
        t.join(30)
        assert not t.is_alive(), "the takeover blocked on the busy relay's locks"
        return orig(records, timeout=timeout)

    slow_pub.publish = publish_with_takeover  # type: ignore[method-assign]
    assert old.run_once() == 10
    slow_pub.publish = orig  # type: ignore[method-assign]
    assert taken_during_batch == []  # nothing could be taken over while the batch was in hand
    assert old.stats.published == 10 and old.stats.fenced == 0
    assert pending_rows(engine) == []

    write(engine, 10, keys=1, start=10)  # now old stalls between rounds; new takes everything over
    lapse_old()
    new.leases.rebalance()
    assert len(new.leases.held) == 32
    assert old.run_once() == 0  # woken with stale leases: claims (and publishes) nothing
    assert old.leases.held == {}
    assert len(slow_pub.messages) == 10
    assert new.drain() == 10
    new.close()
    old.close()
    assert pending_rows(engine) == []


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"], indirect=True)
def test_a_locked_row_is_never_overtaken_by_later_rows_of_its_partition(engine: sa.Engine) -> None:
    """SKIP LOCKED must not let a relay publish past a row someone else holds (e.g. during a handover)."""
    write(engine, 6, keys=2)  # k0: 0,2,4   k1: 1,3,5
    with engine.connect() as c:
        first_k0 = c.execute(sa.select(T.c.id).where(T.c.key == "k0").order_by(T.c.id).limit(1)).scalar_one()
    le = default_tables().leases
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg())
    relay.leases.ensure_partitions()
    with engine.begin() as c:  # a previous owner whose leases lapsed: it may still hold row locks
        c.execute(le.update().values(owner="lapsed-relay", expires_at=dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)))
    relay.start()
    other = engine.connect()
    tx = other.begin()
    other.execute(sa.select(T.c.id).where(T.c.id == first_k0).with_for_update())  # held by "someone else"
    try:
        relay.drain()
        assert "k0" not in seqs_by_key(pub)  # nothing of k0 went out ahead of its locked first message
        assert seqs_by_key(pub).get("k1") == [1, 3, 5]
    finally:
        tx.rollback()
        other.close()
    relay.drain()
    relay.close()
    assert seqs_by_key(pub)["k0"] == [0, 2, 4]


def test_a_drains_rounds_reuse_one_claim_statement_with_each_rounds_start_ids(engine: sa.Engine) -> None:
    """The claim joined back by id (MariaDB, SQLite; PostgreSQL when the batch is smaller than the
    partition count) is built once for a drain: each round's start ids (the last id published in
    each partition) are its parameters, not part of the statement. Before, every round of a drain
    built the statement and its cache key again (a tenth of a MariaDB drain). Every row still goes
    out once, in order per key."""
    write(engine, 60, keys=30)
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg(batch_size=10, pipeline=False, lease_ttl=60.0))
    relay.start()
    statements = []
    while relay.run_once():
        assert relay._claim_cache is not None
        statements.append(relay._claim_cache[1])
    relay.close()
    assert len(statements) >= 6
    assert all(s is statements[0] for s in statements), "the claim statement was built again"
    assert seqs_by_key(pub) == {f"k{k}": [k, k + 30] for k in range(30)}
    assert pending_rows(engine) == []


@pytest.mark.parametrize("dialect_name", ["mariadb"], indirect=True)
def test_innodb_a_neighbours_held_claim_skips_none_of_our_rows_and_no_gap_check_runs(
        engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two relays share the partitions (interleaved in the claim index). The neighbour is mid-batch:
    its claim's locks and its DELETE held in an open transaction, and an application session holds
    uncommitted rows in every partition. Our relay's claim (READ COMMITTED, ``FOR UPDATE SKIP LOCKED``)
    still takes every committed row of its own partitions, so it needs no look-up of the due ids
    again (the gap check, a quarter of a MariaDB drain's database time) once its partitions were
    claimed cleanly. Before, every InnoDB claim ran it, on the belief that next-key locks reach into
    neighbouring index ranges: not so with these statements under READ COMMITTED."""
    import outbox.relay as relay_module

    monkeypatch.setattr(relay_module, "REFRESH", 3600.0)  # no look-ups of delayed rows in the rounds watched
    write(engine, 128, keys=64)
    ours, theirs = (Relay(engine, MemoryPublisher(), config=cfg(relay_id=n, lease_ttl=60.0))
                    for n in ("ours", "theirs"))
    for r in (ours, theirs):
        r.start()
    for _ in range(3):
        for r in (ours, theirs):
            r.leases.register()
            r.leases.rebalance()
    mine, neighbours = sorted(ours.leases.held), sorted(theirs.leases.held)
    assert len(mine) == len(neighbours) == 16 and not set(mine) & set(neighbours)
    assert ours.run_once() > 0  # the first claim of acquired partitions is checked; this one was clean
    write(engine, 128, keys=64, start=128)
    held = theirs.engine.connect()
    held_tx = held.begin()
    stmt, _ = theirs._claim_statement(neighbours, 16, [])
    claimed = [r[0] for r in held.execute(stmt).all()]
    assert claimed
    theirs.dialect.delete_ids(held, T, claimed[: len(claimed) // 2])
    app = Session(engine)
    app.begin()
    for k in range(64):  # uncommitted rows in every partition, ids after the committed ones
        Outbox().add(app, "orders", {"seq": -1}, key=f"k{k}")
    app.flush()
    try:
        with statements(ours.engine) as seen:
            ours.run_once()
    finally:
        app.rollback()
        app.close()
        held_tx.rollback()
        held.close()
    with engine.connect() as c:
        left = c.execute(sa.select(sa.func.count()).select_from(T).where(T.c.partition.in_(mine))).scalar_one()
    assert left == 0, f"{left} committed rows of our partitions were passed over"
    gap_checks = [s for s in seen if "claimable" in s and "FOR UPDATE" not in s.upper()]
    assert gap_checks == [], gap_checks
    theirs.drain()
    for r in (ours, theirs):
        r.close()
    got = {**seqs_by_key(ours.publisher), **seqs_by_key(theirs.publisher)}  # type: ignore[arg-type]
    assert got == {f"k{k}": [k, k + 64, k + 128, k + 192] for k in range(64)}
    assert pending_rows(engine) == []


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"], indirect=True)
def test_a_row_committed_late_with_a_lower_id_is_still_published(engine: sa.Engine) -> None:
    """Claims start after the last published id of each partition; a row whose transaction
    committed after later ids were published must still go out (the watermark is re-read)."""
    box = Outbox()
    late = Session(engine)
    late.begin()
    box.add(late, "t", {"seq": 0, "key": "k0"}, key="k0")
    late.flush()  # id allocated now, committed only after the next rows went out
    write(engine, 5, keys=1, start=1)  # key "k0" too: same partition, higher ids, committed first
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg())
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        assert pub.wait_for(5, timeout=30)
        late.commit()
        assert pub.wait_for(lambda msgs: any(json.loads(m.payload)["seq"] == 0 for m in msgs), timeout=30)
    finally:
        late.close()
        relay.stop()
        t.join(30)
    assert pending_rows(engine) == []


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"], indirect=True)
def test_a_delivered_batch_costs_the_lease_lock_the_claim_and_the_delete(engine: sa.Engine) -> None:
    """The statements of a busy batch where lease rows are locked: no fence re-read, no SAVEPOINT
    (issue 14, P1: the relay's own statements a batch, against the raw loop's SELECT + DELETE)."""
    write(engine, 300, keys=30)
    pub = MemoryPublisher()
    # leases renewed every lease_ttl / 3: at FAST's 3 s a drain slowed past 1 s by a loaded machine
    # ran a rebalance in between (its UPDATEs, and the DELETE of long-expired members)
    relay = Relay(engine, pub, config=cfg(batch_size=100, pipeline=False, lease_ttl=60.0))
    relay.start()
    with statements(relay.engine) as run:
        relay.drain()
    relay.close()
    seen = [" ".join(q.split()[:2]).upper() for q in run]
    assert len(pub.messages) == 300 and pending_rows(engine) == []
    assert not [s for s in seen if "SAVEPOINT" in s], seen
    assert len([s for s in seen if s.startswith("DELETE")]) == relay.stats.rounds >= 3  # one a batch
    assert not [s for s in seen if s.startswith("UPDATE")], seen  # no lease renewal (fence) per batch


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_an_idle_round_is_the_lease_lock_the_claim_and_the_delete(engine: sa.Engine, monkeypatch) -> None:
    """A round after a claim that took all that was due (the idle relay NOTIFY wakes for one row):
    no look-up of delayed rows or blocked keys (they run on their own REFRESH clock, here made
    long), and still every partition is read from its start (issue 14, P3: 5 statements before)."""
    import outbox.relay as relay_module

    monkeypatch.setattr(relay_module, "REFRESH", 3600.0)
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg(relay_id="idle"))
    relay.start()
    write(engine, 1, keys=1)
    assert relay.run_once() == 1  # the first round after start looks everything up
    seen: list[str] = []
    import psycopg

    execute = psycopg.Cursor.execute

    def note(cursor, query, *args, **kw):  # at the driver: the claim runs on psycopg's cursor, past SQLAlchemy
        if cursor.connection is driver and str(query).strip() != ";":  # not the pool's pre-ping
            seen.append(str(query))
        return execute(cursor, query, *args, **kw)

    with relay.engine.connect() as c:  # the relay's pool holds one connection: the one its rounds use
        driver = c.connection.driver_connection
    monkeypatch.setattr(psycopg.Cursor, "execute", note)
    for i in range(3):
        write(engine, 1, keys=1, start=1 + i)
        assert relay.run_once() == 1
    monkeypatch.undo()
    relay.close()
    assert [json.loads(m.payload)["seq"] for m in pub.snapshot()] == [0, 1, 2, 3]
    assert len(seen) == 9, seen  # 3 a round: lease lock, claim, delete
    assert [s.split()[0].upper() for s in seen[:3]] == ["SELECT", "SELECT", "DELETE"], seen


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_a_late_lower_id_after_an_idle_round_goes_out_in_the_next_round(engine: sa.Engine, monkeypatch) -> None:
    """Without the per-round look-ups, a claim that took all that was due still makes the next one
    read its partitions from their start: a row committed late with a lower id is not left for the
    WATERMARK_RESET re-read."""
    import outbox.relay as relay_module

    monkeypatch.setattr(relay_module, "REFRESH", 3600.0)
    monkeypatch.setattr(relay_module, "WATERMARK_RESET", 3600.0)
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg(relay_id="late"))
    relay.start()
    box = Outbox()
    late = Session(engine)
    late.begin()
    box.add(late, "t", {"seq": 0, "key": "k0"}, key="k0")
    late.flush()  # a lower id, committed after the next row went out
    try:
        write(engine, 1, keys=1, start=1)
        assert relay.run_once() == 1
        late.commit()
    finally:
        late.close()
    assert relay.run_once() == 1
    relay.close()
    assert [json.loads(m.payload)["seq"] for m in pub.snapshot()] == [1, 0]


@pytest.mark.parametrize("dialect_name", ["postgresql", "sqlite"], indirect=True)
def test_the_periodic_renewal_is_one_transaction(engine: sa.Engine) -> None:
    """Membership heartbeat, lease rows for new partitions and rebalance commit together: one WAL
    flush in the relay's loop every renew interval instead of three (issue 14, P3)."""
    relay = Relay(engine, MemoryPublisher(), config=cfg(relay_id="beat"))
    relay.start()
    commits: list[int] = []

    def note(conn) -> None:
        commits.append(1)

    sa.event.listen(relay.engine, "commit", note)
    try:
        relay._last_rebalance = 0.0  # due
        relay._maybe_rebalance(overdue_only=True)  # overdue too: renews
        assert relay._last_rebalance > 0.0
    finally:
        sa.event.remove(relay.engine, "commit", note)
    relay.close()
    assert len(commits) == 1, commits
