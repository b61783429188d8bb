"""The relay's own pool: a ping only for a connection that rested a while, session settings set once.

A relay checks a connection out for every round; at low load a round is a few round trips, and
SQLAlchemy's ``pool_pre_ping`` added one more to each (``;`` on psycopg). The relay's pool now pings
only a connection back for :data:`outbox.dialects.base.PING_AFTER_IDLE` seconds or more (HikariCP's
rule). These tests pin the three cases down on the servers: a connection just returned is handed out
without a ping; one that rested and died meanwhile is found dead by the ping and replaced, so the
round goes through; one that died within the window fails that round's first statement, a lost
connection the relay retries, and the next round publishes the row.

On MySQL/MariaDB the relay's sessions run READ COMMITTED, set once per new connection: SQLAlchemy's
``isolation_level`` execution option, used before, sent ``SET SESSION TRANSACTION ISOLATION LEVEL`` at
every checkout and at every return, outside its error handling.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox.dialects.base as dialect_base
from outbox import Outbox, default_tables
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay
from tests.conftest import postgresql_only

T = default_tables().outbox
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "progress_interval": 0, "batch_size": 100}


@pytest.fixture
def server(dialect_name: str, engine: sa.Engine) -> sa.Engine:
    if dialect_name == "sqlite":
        pytest.skip("SQLite has no server connection to lose; the relay uses the application's engine there")
    return engine


@pytest.fixture
def relay(server: sa.Engine) -> Iterator[Relay]:
    r = Relay(server, MemoryPublisher(), config=RelayConfig(**FAST))
    r.start()
    yield r
    r.close()


def add_one(engine: sa.Engine, n: int) -> None:
    with Session(engine) as s, s.begin():
        Outbox().add(s, "pool.ping", {"n": n}, key=f"k{n}")


def _session_id_sql(engine: sa.Engine) -> str:
    return "SELECT pg_backend_pid()" if engine.dialect.name == "postgresql" else "SELECT CONNECTION_ID()"


def _pooled_session_ids(relay: Relay) -> list[int]:
    """The server session id of every connection resting in the relay's pool (each checked out once)."""
    conns = [relay.engine.connect() for _ in range(relay.engine.pool.checkedin())]
    try:
        return [int(c.exec_driver_sql(_session_id_sql(relay.engine)).scalar_one()) for c in conns]
    finally:
        for c in conns:
            c.close()


def _kill(admin: sa.Engine, session_ids: list[int]) -> None:
    """End these server sessions and wait until the server shows none of them."""
    with admin.connect() as c:
        for sid in session_ids:
            if admin.dialect.name == "postgresql":
                c.execute(sa.text("SELECT pg_terminate_backend(:sid)"), {"sid": sid})
            else:
                c.exec_driver_sql("KILL CONNECTION %s", (sid,))
        c.commit()
        listed = ("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:ids)" if admin.dialect.name == "postgresql"
                  else "SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID IN :ids")
        query = sa.text(listed)
        if admin.dialect.name != "postgresql":
            query = query.bindparams(sa.bindparam("ids", expanding=True))
        deadline = time.monotonic() + 10
        while c.execute(query, {"ids": session_ids}).scalar_one():
            c.rollback()
            assert time.monotonic() < deadline, f"sessions {session_ids} still listed after 10 s"
            time.sleep(0.01)


def test_a_connection_back_from_a_round_is_handed_out_again_without_a_ping(
        dialect_name: str, server: sa.Engine, relay: Relay, psycopg_statements: list[str]) -> None:
    """Two rounds back to back: the second sends no ``;`` (psycopg's ping) before its statements."""
    postgresql_only(dialect_name, server, "psycopg's ping is a statement the cursor sees")
    add_one(server, 0)
    assert relay.run_once() == 1
    add_one(server, 1)  # the application's engine pings: its pool_pre_ping is its own
    psycopg_statements.clear()
    assert relay.run_once() == 1
    assert psycopg_statements, "the round sent nothing through psycopg's cursor"
    assert [q for q in psycopg_statements if q.strip() == ";"] == [], psycopg_statements


def test_a_connection_that_rested_past_the_window_is_pinged_and_replaced_when_dead(
        server: sa.Engine, relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pooled connection killed on the server while resting: the ping finds that out, the pool
    reconnects, and the round publishes the row without an error."""
    add_one(server, 0)
    assert relay.run_once() == 1
    monkeypatch.setattr(dialect_base, "PING_AFTER_IDLE", 0.0)  # every connection has rested long enough
    ids = _pooled_session_ids(relay)
    assert ids
    _kill(server, ids)
    add_one(server, 1)
    assert relay.run_once() == 1
    assert [m.key for m in relay.publisher.snapshot()] == ["k0", "k1"]  # type: ignore[attr-defined]
    assert not set(_pooled_session_ids(relay)) & set(ids)


def test_a_connection_lost_within_the_window_fails_one_round_and_the_next_publishes(
        server: sa.Engine, relay: Relay) -> None:
    """Killed right after its last use, the connection is handed out unpinged: the round's first
    statement fails as a lost connection (a ``DBAPIError`` that invalidated it, which the relay's loop
    retries), nothing is published or deleted, and the next round publishes the row."""
    add_one(server, 0)
    assert relay.run_once() == 1
    add_one(server, 1)
    _kill(server, _pooled_session_ids(relay))
    with pytest.raises(sa.exc.DBAPIError) as info:
        relay.run_once()
    assert info.value.connection_invalidated, info.value
    assert [m.key for m in relay.publisher.snapshot()] == ["k0"]  # type: ignore[attr-defined]
    assert relay.run_once() == 1
    assert [m.key for m in relay.publisher.snapshot()] == ["k0", "k1"]  # type: ignore[attr-defined]
    with server.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 0


def test_the_relay_pool_keeps_the_applications_engine_untouched(server: sa.Engine, relay: Relay) -> None:
    """The ping rule is the relay's pool's alone: the application's engine keeps its own settings."""
    assert relay.engine is not server
    assert relay.engine.pool is not server.pool
    assert not relay.engine.pool._pre_ping
    own: Any = server.pool
    assert own._pre_ping is True  # tests/conftest.py's engines ask for pool_pre_ping


def test_mysql_relay_sessions_read_committed_and_a_round_sends_no_set(
        dialect_name: str, server: sa.Engine, relay: Relay, monkeypatch: pytest.MonkeyPatch) -> None:
    if dialect_name != "mariadb":
        pytest.skip("the isolation level is MySQL/MariaDB's setting (PostgreSQL's default is READ COMMITTED)")
    import pymysql

    sent: list[str] = []
    real = pymysql.connections.Connection.query

    def query(self: Any, sql: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(sql.decode() if isinstance(sql, bytes) else str(sql))
        return real(self, sql, *args, **kwargs)

    add_one(server, 0)
    assert relay.run_once() == 1
    add_one(server, 1)
    monkeypatch.setattr(pymysql.connections.Connection, "query", query)
    assert relay.run_once() == 1
    monkeypatch.undo()
    assert sent, "the round sent nothing through pymysql"
    assert [q for q in sent if q.lstrip().upper().startswith("SET")] == [], sent
    with relay.engine.connect() as c:
        assert c.exec_driver_sql("SELECT @@SESSION.tx_isolation").scalar_one() == "READ-COMMITTED"
    with server.connect() as c:  # the application's sessions keep the server's default
        assert c.exec_driver_sql("SELECT @@SESSION.tx_isolation").scalar_one() == "REPEATABLE-READ"


def test_a_raw_driver_error_raised_outside_sqlalchemys_wrapping_is_retried_by_the_loop(
        server: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    """A driver error that reaches the relay's loop unwrapped (here from an ``engine_connect`` listener,
    where SQLAlchemy does not translate it into a ``DBAPIError``; last session's isolation-level SET ran
    there) is the database's trouble like any lost connection: the loop logs it, backs off and goes
    on, and the row is published. Before, it was not in the loop's transient errors and stopped it."""
    relay = Relay(server, MemoryPublisher(), config=RelayConfig(**FAST, backoff_initial=0.01, backoff_max=0.05))
    driver_error = server.dialect.loaded_dbapi.OperationalError
    failures: list[int] = []

    def lose_once(_conn: sa.Connection) -> None:
        if not failures:
            failures.append(1)
            raise driver_error("server closed the connection unexpectedly (injected)")

    sa.event.listen(relay.engine, "engine_connect", lose_once)
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:  # what stops the loop is the finding
            crashed.append(exc)

    add_one(server, 0)
    t = threading.Thread(target=run, daemon=True)
    with caplog.at_level("ERROR", logger="outbox.relay"):
        t.start()
        try:
            published = relay.publisher.wait_for(1, timeout=30)  # type: ignore[attr-defined]
        finally:
            relay.stop()
            t.join(30)
    assert not crashed, crashed
    assert failures and published
    assert [m.key for m in relay.publisher.snapshot()] == ["k0"]  # type: ignore[attr-defined]
    assert any("database unavailable" in r.getMessage() and "injected" in r.getMessage() for r in caplog.records)
