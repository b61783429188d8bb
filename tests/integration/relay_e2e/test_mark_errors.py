"""Database errors while marking a published batch: classified, isolated to the rows at fault.

A permanent error (a trigger or constraint refusing one row, a value out of range) used to be
retried as "database unavailable", republishing the whole batch on every retry (42 messages became
345 copies). Now the delivered rows are still recorded in the same transaction, the offending row
is marked dead with the reason, and N messages give N deliveries. Outages stay transient.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from outbox._dberrors import ErrorKind, classify_db_error
from outbox.brokers.base import Outcome
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.dialects import dialect_for
from outbox.errors import ConfigurationError
from outbox.relay import Relay

from .conftest import TABLES, declare_queue, relay_args, run_cli, wait_until, write

OUT = TABLES.outbox
DIALECTS = ["sqlite", "postgresql", "mariadb"]
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2,
        "progress_interval": 0, "lease_ttl": 3.0}


def _trigger_sql(dialect: str, event: str, condition: str) -> list[str]:
    """A trigger refusing ``event`` (DELETE / UPDATE) on rows matching ``condition`` (OLD./NEW. columns)."""
    if dialect == "sqlite":
        return [f"CREATE TRIGGER okt_refuse BEFORE {event} ON outbox_messages WHEN {condition} "
                "BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END"]
    if dialect == "postgresql":
        ret = "OLD" if event == "DELETE" else "NEW"
        return [
            "CREATE OR REPLACE FUNCTION okt_refuse() RETURNS trigger AS $$ BEGIN "
            f"IF {condition} THEN RAISE EXCEPTION 'refused by test trigger'; END IF; RETURN {ret}; END $$ "
            "LANGUAGE plpgsql",
            f"CREATE TRIGGER okt_refuse BEFORE {event} ON outbox_messages FOR EACH ROW EXECUTE FUNCTION okt_refuse()",
        ]
    return [f"CREATE TRIGGER okt_refuse BEFORE {event} ON outbox_messages FOR EACH ROW BEGIN "
            f"IF {condition} THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by test trigger'; "
            "END IF; END"]


@contextlib.contextmanager
def refusing(engine: sa.Engine, events: list[tuple[str, str]]) -> Iterator[None]:
    """Install triggers refusing each (event, condition); dropped afterwards whatever happens."""
    dialect = engine.dialect.name
    names = []
    try:
        for n, (event, condition) in enumerate(events):
            with engine.begin() as c:
                for stmt in _trigger_sql(dialect, event, condition):
                    c.exec_driver_sql(stmt.replace("okt_refuse", f"okt_refuse{n}"))
            names.append(f"okt_refuse{n}")
        yield
    finally:
        with engine.begin() as c:
            for name in names:
                if dialect == "postgresql":
                    c.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON outbox_messages")
                    c.exec_driver_sql(f"DROP FUNCTION IF EXISTS {name}()")
                else:
                    c.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")


def q(dialect: str, col: str) -> str:
    return f"`{col}`" if dialect == "mariadb" else f'"{col}"'


class Daemon:
    """``Relay.run`` in a thread; errors it raises are kept for the test."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.relay.run()
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self.relay.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors


def rows(engine: sa.Engine) -> list[sa.Row]:
    with engine.connect() as c:
        q = sa.select(OUT.c.id, OUT.c.key, OUT.c.status, OUT.c.last_error, OUT.c.attempts).order_by(OUT.c.id)
        return list(c.execute(q))


def settle(relay: Relay, rounds: int = 15) -> None:
    """Let the relay go through ``rounds`` more claim rounds (a republish loop would show by then)."""
    start = relay.stats.rounds + relay.stats.errors
    wait_until(lambda: relay.stats.rounds + relay.stats.errors >= start + rounds or relay.stopping, 60,
               f"{rounds} more relay rounds")


@pytest.fixture
def idle_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count idle rounds too, so `settle` can wait for rounds that find nothing (a test-side hook)."""
    original = Relay.run_once

    def counting(self: Relay) -> int:
        n = original(self)
        if n == 0:
            self.stats.rounds += 1
        return n

    monkeypatch.setattr(Relay, "run_once", counting)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_one_row_refusing_delete_n_messages_n_deliveries(db, dialect: str, idle_rounds: None) -> None:
    d = db(dialect)
    write(d.engine, "orders", range(41), keys=7)
    write(d.engine, "orders", [41], key="poison")
    with refusing(d.engine, [("DELETE", f"OLD.{q(dialect, 'key')} = 'poison'")]):
        pub = MemoryPublisher()
        relay = Relay(d.engine, pub, config=RelayConfig(**FAST, batch_size=100))
        daemon = Daemon(relay)
        try:
            wait_until(lambda: any(r.status == "dead" for r in rows(d.engine)), 60, "the refused row to go dead")
            settle(relay)
        finally:
            daemon.stop()
    # before the fix: the DELETE failed, was retried as "database unavailable" and all 42 went out again
    assert len(pub.messages) == 42, f"{len(pub.messages)} deliveries for 42 messages"
    left = rows(d.engine)
    assert [(r.key, r.status) for r in left] == [("poison", "dead")]
    assert "published, but the row could not be deleted" in left[0].last_error
    assert "refused by test trigger" in left[0].last_error
    assert relay.stats.published == 42


@pytest.mark.parametrize("dialect", DIALECTS)
def test_retry_that_cannot_be_recorded_marks_the_row_dead(db, dialect: str, idle_rounds: None) -> None:
    d = db(dialect)
    write(d.engine, "orders", range(30), keys=5)
    write(d.engine, "orders", [30], key="poison")
    cond = f"NEW.{q(dialect, 'attempts')} > OLD.{q(dialect, 'attempts')} AND OLD.{q(dialect, 'key')} = 'poison'"
    with refusing(d.engine, [("UPDATE", cond)]):
        pub = MemoryPublisher()
        pub.fail(lambda r: r.key == "poison", Outcome.RETRY, "leader not available")
        relay = Relay(d.engine, pub, config=RelayConfig(**FAST))
        daemon = Daemon(relay)
        try:
            wait_until(lambda: any(r.status == "dead" for r in rows(d.engine)), 60, "the poison row to go dead")
            settle(relay)
        finally:
            daemon.stop()
    assert len(pub.messages) == 30
    assert len({m.id for m in pub.messages}) == 30
    (left,) = rows(d.engine)
    assert left.status == "dead" and left.attempts == 0
    assert "not delivered (leader not available), and the retry could not be recorded" in left.last_error


@pytest.mark.parametrize("dialect", DIALECTS)
def test_row_that_cannot_be_updated_at_all_is_not_republished_in_a_loop(db, dialect: str, idle_rounds: None,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    d = db(dialect)
    write(d.engine, "orders", range(20), keys=4)
    write(d.engine, "orders", [20], key="poison")
    key = q(dialect, "key")
    with refusing(d.engine, [("DELETE", f"OLD.{key} = 'poison'"), ("UPDATE", f"OLD.{key} = 'poison'")]):
        pub = MemoryPublisher()
        relay = Relay(d.engine, pub, config=RelayConfig(**FAST))
        daemon = Daemon(relay)
        try:
            wait_until(lambda: len(pub.messages) >= 21, 60, "21 deliveries")
            settle(relay, rounds=25)
        finally:
            daemon.stop()
    assert len(pub.messages) == 21
    assert [(r.key, r.status) for r in rows(d.engine)] == [("poison", "pending")]
    assert "cannot be updated at all" in caplog.text


def test_relay_over_rabbitmq_one_refused_row_n_deliveries(db, rabbitmq_url, amqp_names, rabbit_reader,
                                                          start_relay) -> None:
    """The same with a real broker and the `outbox relay` process: 42 messages, 42 copies in the queue."""
    d = db("postgresql")
    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    declare_queue(rabbitmq_url, exchange, queue)
    reader = rabbit_reader(rabbitmq_url, queue)
    write(d.engine, exchange, range(41), keys=7)
    write(d.engine, exchange, [41], key="poison")
    with refusing(d.engine, [("DELETE", "OLD.key = 'poison'")]):
        relay = start_relay(*relay_args(d.url, "--rabbitmq", rabbitmq_url), name="rabbit")
        wait_until(lambda: d.dead_rows(), 60, "the refused row to go dead")
        reader.wait_count(42, timeout=60)
        # more rounds: a republish loop would add copies
        write(d.engine, exchange, [1000], key="k0")
        reader.wait_seqs({1000}, timeout=60)
        reader.poll(1.0)
        assert relay.stop() == 0
    assert sorted(m.seq for m in reader.got) == [*range(42), 1000]
    (dead,) = d.dead_rows()
    assert dead.key == "poison" and "refused by test trigger" in dead.last_error


# ------------------------------------------------------------------ classification of real errors


@pytest.mark.parametrize("dialect", DIALECTS)
def test_data_errors_are_permanent(db, dialect: str) -> None:
    d = db(dialect)
    write(d.engine, "orders", [1], key="k")
    kind = dialect_for(d.engine)
    with refusing(d.engine, [("DELETE", "1 = 1")]), pytest.raises(sa.exc.DBAPIError) as refused:
        with d.engine.begin() as c:
            c.execute(OUT.delete())
    assert classify_db_error(refused.value, kind) is ErrorKind.PERMANENT
    if dialect != "sqlite":  # SQLite integers have no overflow on UPDATE
        with pytest.raises(sa.exc.DBAPIError) as overflow:
            with d.engine.begin() as c:
                c.execute(OUT.update().values(attempts=2**31 - 1))
                c.execute(OUT.update().values(attempts=OUT.c.attempts + 1))
        assert classify_db_error(overflow.value, kind) is ErrorKind.PERMANENT, overflow.value


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_lock_wait_timeout_is_transient(db, dialect: str) -> None:
    d = db(dialect)
    write(d.engine, "orders", [1], key="k")
    timeout = "SET lock_timeout = '200ms'" if dialect == "postgresql" else "SET innodb_lock_wait_timeout = 1"
    with d.engine.connect() as holder, d.engine.connect() as waiter:
        holder.begin()
        holder.execute(OUT.update().values(attempts=1))
        waiter.begin()
        waiter.exec_driver_sql(timeout)
        with pytest.raises(sa.exc.DBAPIError) as waited:
            waiter.execute(OUT.update().values(attempts=2))
        holder.rollback()
        waiter.rollback()
    assert classify_db_error(waited.value, dialect_for(d.engine)) is ErrorKind.TRANSIENT, waited.value


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_connection_cut_is_transient(db, dialect: str, fault_proxy) -> None:
    d = db(dialect)
    url = sa.engine.make_url(d.url)
    proxy = fault_proxy(url.host or "127.0.0.1", url.port or (5432 if dialect == "postgresql" else 3306))
    engine = sa.create_engine(url.set(host="127.0.0.1", port=proxy.port), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as c:
            c.execute(sa.select(1))
            proxy.outage()
            with pytest.raises(sa.exc.DBAPIError) as cut:
                c.execute(sa.select(1))
    finally:
        engine.dispose()
    assert classify_db_error(cut.value, dialect_for(d.engine)) is ErrorKind.TRANSIENT, cut.value


# ------------------------------------------------------------------ relay id


@pytest.mark.parametrize("bad, fragment", [("x" * 300, "at most 255 characters"), ("", "must not be empty"),
                                           ("relay\n1", "control characters")], ids=["long", "empty", "newline"])
def test_relay_id_is_validated(bad: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        RelayConfig(relay_id=bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e12], ids=["nan", "inf", "huge"])
def test_backoff_that_would_overflow_the_retry_time_is_refused(value: float) -> None:
    """Before: accepted, and the first retry crashed the relay (timedelta overflow / NaN) at mark time."""
    with pytest.raises(ConfigurationError, match="up to 31,536,000"):
        RelayConfig(backoff_max=value)


def test_relay_with_a_300_character_id_refuses_to_start(db) -> None:
    """Before the fix it logged "database unavailable" forever (the id did not fit String(255))."""
    d = db("sqlite")
    done = run_cli("relay", "--db", d.url, "--rabbitmq", "amqp://guest:guest@127.0.0.1:5672/%2F",
                   "--relay-id", "r" * 300, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "relay_id" in done.stderr and "255" in done.stderr
    assert "unavailable" not in done.stderr


class CutAfterFirstPublish(MemoryPublisher):
    """Drops the relay's database connections right after the first batch is published (a test-side hook)."""

    def __init__(self, proxy) -> None:
        super().__init__()
        self.proxy = proxy
        self.cut = False

    def publish(self, records, *, timeout: float = 30.0):
        results = super().publish(records, timeout=timeout)
        if not self.cut:
            self.cut = True
            self.proxy.outage()  # the marking statements now hit a dead connection
            self.proxy.accept()
        return results


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_connection_cut_while_marking_is_retried_not_dead(db, dialect: str, fault_proxy) -> None:
    d = db(dialect)
    write(d.engine, "orders", range(50), keys=5)
    url = sa.engine.make_url(d.url)
    proxy = fault_proxy(url.host or "127.0.0.1", url.port or (5432 if dialect == "postgresql" else 3306))
    engine = sa.create_engine(url.set(host="127.0.0.1", port=proxy.port), pool_pre_ping=True)
    pub = CutAfterFirstPublish(proxy)
    relay = Relay(engine, pub, config=RelayConfig(**FAST))
    daemon = Daemon(relay)
    try:
        wait_until(lambda: d.rows() == 0, 60, "every row to be published and deleted")
    finally:
        daemon.stop()
        engine.dispose()
    assert pub.cut and relay.stats.errors >= 1  # the cut was seen, as an outage
    assert relay.stats.dead == 0 and d.dead_rows() == []
    assert len({m.message_id for m in pub.messages}) == 50  # every message out (the first batch twice)
