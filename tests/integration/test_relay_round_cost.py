"""What one relay round sends on PostgreSQL with psycopg: the properties an idle relay's latency rests on.

A round at low load claims a few rows: it locks the relay's lease rows, claims, publishes, deletes
and commits. The lease lock and the delete are the same statements every round, so on psycopg they
run on the driver's cursor, compiled once (as the claim and the writer's ``add()`` do; so do audit
mode's UPDATE marking the rows published and the look-ups of delayed rows and blocked keys that run
every few rounds), not through
``Connection.execute``, whose per-call set-up (the IN list expanded again, a cache key, the result
wrapped) cost about a millisecond of a 3.5 ms idle round (docs/benchmarks.md, tenth session). A
relay whose statements are watched (a ``before_cursor_execute`` listener such as OpenTelemetry's,
``echo``) still shows every one of them.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from outbox import Outbox, default_tables
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.dialects import dialect_for
from outbox.relay import Relay
from tests.conftest import postgresql_only

T = default_tables().outbox
L = default_tables().leases
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "progress_interval": 0, "batch_size": 100}


@pytest.fixture
def pg(dialect_name: str, engine: sa.Engine) -> sa.Engine:
    return postgresql_only(dialect_name, engine, "the driver-cursor paths are PostgreSQL's with psycopg")


@pytest.fixture
def relay_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {**FAST, **getattr(request, "param", {})}


@pytest.fixture
def relay(pg: sa.Engine, relay_config: dict[str, Any]) -> Iterator[Relay]:
    r = Relay(pg, MemoryPublisher(), config=RelayConfig(**relay_config))
    r.start()
    yield r
    r.close()


def add_one(engine: sa.Engine, n: int) -> None:
    with Session(engine) as s, s.begin():
        Outbox().add(s, "cost.round", {"n": n}, key=f"k{n}")


def _sql(statement: str) -> str:
    """``statement`` on one line, upper case: what the predicates below look at."""
    return " ".join(statement.split()).upper()


def _is_lease_lock(statement: str) -> bool:
    s = _sql(statement)
    return s.startswith("SELECT") and f"FROM {L.name.upper()}" in s and "FOR UPDATE" in s


def _is_delete(statement: str) -> bool:
    return _sql(statement).startswith(f"DELETE FROM {T.name.upper()}")


def _is_claim(statement: str) -> bool:
    s = _sql(statement)
    return s.startswith("SELECT") and f"FROM {T.name.upper()}" in s and "SKIP LOCKED" in s


def _is_update(statement: str) -> bool:
    return _sql(statement).startswith(f"UPDATE {T.name.upper()} SET")


def _is_promote_look_up(statement: str) -> bool:
    s = _sql(statement)
    return s.startswith("SELECT") and f"FROM {T.name.upper()}" in s and "AVAILABLE_AT <=" in s


def _is_blockers_look_up(statement: str) -> bool:
    s = _sql(statement)
    return s.startswith("SELECT") and f"FROM {T.name.upper()}" in s and "GROUP BY" in s


@pytest.fixture
def core_statements(relay: Relay) -> Iterator[list[str]]:
    """Every statement ``Connection.execute`` runs on the relay's engine (the statement-level
    ``before_execute`` event, which is not a cursor event)."""
    core: list[str] = []

    def note(conn: Any, clause: Any, *_: Any) -> None:
        core.append(str(clause.compile(dialect=conn.dialect)))

    event.listen(relay.engine, "before_execute", note)
    yield core
    event.remove(relay.engine, "before_execute", note)


def test_a_round_locks_the_leases_and_deletes_on_psycopgs_cursor(pg: sa.Engine, relay: Relay,
                                                                 psycopg_statements: list[str],
                                                                 core_statements: list[str]) -> None:
    """No ``Connection.execute`` for the lease lock and the delete; psycopg's cursor ran both; the
    row was published once and deleted."""
    add_one(pg, 0)
    assert relay.run_once() == 1  # warm: statements built, leases locked once
    psycopg_statements.clear()
    core_statements.clear()
    add_one(pg, 1)
    assert relay.run_once() == 1
    assert [q for q in psycopg_statements if _is_lease_lock(q)], psycopg_statements
    assert [q for q in psycopg_statements if _is_delete(q)], psycopg_statements
    assert not [c for c in core_statements if _is_lease_lock(c) or _is_delete(c)], core_statements
    assert len(relay.publisher.snapshot()) == 2  # type: ignore[attr-defined]
    with pg.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 0


@pytest.mark.parametrize("relay_config", [{"delete_published": False}], indirect=True)
def test_audit_mode_marks_published_on_psycopgs_cursor(pg: sa.Engine, relay: Relay, psycopg_statements: list[str],
                                                       core_statements: list[str]) -> None:
    add_one(pg, 0)
    before = dt.datetime.now(dt.timezone.utc)
    assert relay.run_once() == 1
    assert [q for q in psycopg_statements if _is_update(q)], psycopg_statements
    assert not [c for c in core_statements if _is_update(c)], core_statements
    with pg.connect() as c:
        status, published_at = c.execute(sa.select(T.c.status, T.c.published_at)).one()
    assert status == "published"
    assert published_at.tzinfo is not None and before - dt.timedelta(seconds=5) <= published_at
    assert published_at <= dt.datetime.now(dt.timezone.utc)


def test_the_look_ups_of_delayed_rows_and_blocked_keys_run_on_psycopgs_cursor(
        pg: sa.Engine, relay: Relay, psycopg_statements: list[str], core_statements: list[str]) -> None:
    """They run every few rounds (``REFRESH``), built once for the relay's partitions; the delayed
    row's look-up takes the time of each run, so the row goes out once it is due, not before."""
    with Session(pg) as s, s.begin():
        Outbox().add(s, "cost.round", {"n": 0}, key="k0", delay=0.3)
    relay._refresh_due = True
    assert relay.run_once() == 0
    assert [q for q in psycopg_statements if _is_promote_look_up(q)], psycopg_statements
    assert [q for q in psycopg_statements if _is_blockers_look_up(q)], psycopg_statements
    assert not [c for c in core_statements if _is_promote_look_up(c) or _is_blockers_look_up(c)], core_statements
    with pg.connect() as c:
        due_at = c.execute(sa.select(T.c.available_at)).scalar_one()
    time.sleep(max(0.0, (due_at - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 0.05)  # a clock to pass
    relay._refresh_due = True
    assert relay.run_once() == 1
    assert len(relay.publisher.snapshot()) == 1  # type: ignore[attr-defined]


def test_a_watched_relay_shows_its_statements_to_cursor_listeners(pg: sa.Engine, relay: Relay) -> None:
    """The lease lock, the claim, the delete and the look-ups, through ``Connection.execute``: a
    listener such as OpenTelemetry's SQLAlchemy instrumentation sees every statement of a round."""
    add_one(pg, 0)
    assert relay.run_once() == 1
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(relay.engine, "before_cursor_execute", note)
    try:
        add_one(pg, 1)
        assert relay.run_once() == 1
    finally:
        event.remove(relay.engine, "before_cursor_execute", note)
    assert [s for s in seen if _is_lease_lock(s)], seen
    assert [s for s in seen if _is_claim(s)], seen
    assert [s for s in seen if _is_delete(s)], seen
    seen.clear()
    event.listen(relay.engine, "before_cursor_execute", note)
    try:
        relay._refresh_due = True
        assert relay.run_once() == 0
    finally:
        event.remove(relay.engine, "before_cursor_execute", note)
    assert [s for s in seen if _is_promote_look_up(s)], seen
    assert [s for s in seen if _is_blockers_look_up(s)], seen


def test_the_direct_delete_raises_sqlalchemys_error_and_the_transaction_can_roll_back(pg: sa.Engine) -> None:
    """A driver error on the direct path is SQLAlchemy's ``DBAPIError`` subclass, as the relay
    classifies errors of ``Connection.execute``: here a table that does not exist."""
    missing = sa.Table("outbox_no_such_table", sa.MetaData(), sa.Column("id", sa.BigInteger, primary_key=True))
    with pg.connect() as conn:
        dialect = dialect_for(conn)
        with pytest.raises(sa.exc.ProgrammingError) as info:
            dialect.delete_ids(conn, missing, [1, 2, 3])
        assert "outbox_no_such_table" in str(info.value)
        conn.rollback()
        assert conn.execute(sa.select(sa.literal(1))).scalar_one() == 1


def test_a_driver_error_of_a_direct_select_goes_through_sqlalchemys_error_handling(pg: sa.Engine) -> None:
    """The direct SELECTs (the claim, the lease lock, the look-ups) handle a driver error as every other
    statement does: ``handle_error`` listeners see it (and a lost connection invalidates the pool, as on
    ``Connection.execute``), and it is raised as SQLAlchemy's ``DBAPIError`` subclass."""
    missing = sa.Table("outbox_no_such_table", sa.MetaData(), sa.Column("id", sa.BigInteger, primary_key=True))
    seen: list[BaseException] = []

    def on_error(context: Any) -> None:
        seen.append(context.original_exception)

    event.listen(pg, "handle_error", on_error)
    try:
        with pg.connect() as conn:
            run = dialect_for(conn).prepared_select(sa.select(missing.c.id).where(missing.c.id > 0))
            with pytest.raises(sa.exc.ProgrammingError) as info:
                run(conn)
            assert "outbox_no_such_table" in str(info.value)
            conn.rollback()
            assert conn.execute(sa.select(sa.literal(1))).scalar_one() == 1
    finally:
        event.remove(pg, "handle_error", on_error)
    assert len(seen) == 1 and "outbox_no_such_table" in str(seen[0]), seen
