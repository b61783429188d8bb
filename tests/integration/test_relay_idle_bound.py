"""The relay's idle-in-transaction bound and its stale-batch check, on the real databases.

- The relay's own sessions carry ``RelayConfig.idle_transaction_timeout`` (PostgreSQL
  ``idle_in_transaction_session_timeout``, MariaDB ``idle_transaction_timeout``); the application's
  engine, passed to the relay, is left as it was.
- A relay transaction left idle past the bound is ended by the server; the error is transient.
- A batch whose claim returned more than ``stale_claim_age`` ago (the relay was paused between the
  claim and the publish; a pause inside the test's own subclass) is rolled back unpublished, also
  when the server has ended the session meanwhile, and the next round publishes it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
import sqlalchemy as sa

from outbox._dberrors import ErrorKind, classify_db_error
from outbox.brokers.memory import MemoryPublisher
from outbox.message import OutboxRecord
from outbox.relay import Relay

from .test_relay import cfg, write

SERVER = ["postgresql", "mariadb"]


def _bound_of(conn: sa.Connection) -> float:
    """This session's idle-in-transaction bound in seconds (0: none)."""
    if conn.dialect.name == "postgresql":
        return int(conn.exec_driver_sql(
            "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'").scalar_one()) / 1000
    return float(conn.exec_driver_sql("SELECT @@session.idle_transaction_timeout").scalar_one())


class PausingRelay(Relay):
    """Sleeps ``pause`` seconds right after its first claim that returned rows (a freeze, in-process)."""

    pause = 0.0

    def _claim(self, *args: Any, **kwargs: Any) -> list[OutboxRecord]:
        records = super()._claim(*args, **kwargs)
        if records and self.pause:
            pause, self.pause = self.pause, 0.0
            time.sleep(pause)
        return records


@pytest.mark.parametrize("dialect_name", SERVER)
def test_the_relay_sessions_carry_the_bound_and_the_applications_engine_does_not(engine):
    config = cfg(publish_timeout=2.0, lease_ttl=3.0)
    assert config.idle_transaction_timeout == 5.0
    relay = Relay(engine, MemoryPublisher(), config=config)
    try:
        assert relay.engine is not engine
        with relay.engine.connect() as conn:
            assert _bound_of(conn) == 5.0
        with relay.engine.connect() as conn:
            conn.rollback()  # a rollback on a fresh connection keeps the bound (it was committed)
            assert _bound_of(conn) == 5.0
        with engine.connect() as conn:
            assert _bound_of(conn) == 0
    finally:
        relay.close()


def test_sqlite_has_no_bound_and_keeps_the_given_engine(database_urls):
    engine = sa.create_engine(database_urls["sqlite"])
    relay = Relay(engine, MemoryPublisher(), config=cfg())
    assert relay.engine is engine


@pytest.mark.parametrize("dialect_name", SERVER)
def test_a_relay_transaction_idle_past_the_bound_is_ended_by_the_server_and_is_transient(engine):
    relay = Relay(engine, MemoryPublisher(), config=cfg(publish_timeout=0.5, lease_ttl=1.0))  # bound 1.5 s
    try:
        with pytest.raises(sa.exc.DBAPIError) as info:
            with relay.engine.begin() as conn:
                # a statement on a table: MariaDB starts no transaction for a bare SELECT 1
                conn.execute(sa.text("SELECT count(*) FROM outbox_relay_leases"))
                time.sleep(relay.config.idle_transaction_timeout + 1.5)  # the freeze itself
                conn.execute(sa.text("SELECT 1"))
        assert classify_db_error(info.value, relay.dialect) is ErrorKind.TRANSIENT
        with relay.engine.connect() as conn:  # the pool recovers
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        relay.close()


@pytest.mark.parametrize("dialect_name", SERVER)
@pytest.mark.parametrize("past_the_bound", [False, True], ids=["session-alive", "session-ended"])
def test_a_batch_claimed_too_long_ago_is_rolled_back_unpublished(engine, past_the_bound, caplog):
    config = cfg(publish_timeout=0.5, lease_ttl=1.0)  # stale after 0.5 s, bound 1.5 s
    pub = MemoryPublisher()
    relay = PausingRelay(engine, pub, config=config)
    relay.pause = config.idle_transaction_timeout + 1.5 if past_the_bound else config.stale_claim_age + 0.4
    write(engine, 20)
    try:
        with caplog.at_level(logging.WARNING, logger="outbox.relay"):
            assert relay.run_once() == 0
        assert pub.messages == []
        with engine.connect() as conn:
            pending = conn.execute(sa.text("SELECT count(*) FROM outbox_messages WHERE status = 'pending'")).scalar()
        assert pending == 20, "the stale batch must stay pending"
        dropped = [r.getMessage() for r in caplog.records if "dropped a stale batch" in r.getMessage()]
        assert len(dropped) == 1, caplog.text
        assert ("session is gone" in dropped[0]) is past_the_bound, dropped[0]
        relay._maybe_rebalance()  # renew: the pause may have outlasted the 1 s lease
        relay.leases.rebalance()
        assert relay.drain(timeout=30) == 20
        assert sorted(json.loads(m.payload)["seq"] for m in pub.messages) == list(range(20))
    finally:
        relay.close()
