"""The pipelined relay (issue 14, part 1) on PostgreSQL: while the broker acknowledges a batch, the
next one is claimed in a second transaction; it is published only after the first is committed and
only if the first was delivered whole, under the same leases.

The publisher here sends at ``begin_publish`` and hands the verdicts over later, as Kafka's does.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, default_tables
from outbox.brokers.base import Outcome, PublishResult
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.message import OutboxRecord
from outbox.relay import Relay
from tests.conftest import postgresql_only

T = default_tables().outbox
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.1,
        "progress_interval": 0, "batch_size": 100}


class TwoStepPublisher(MemoryPublisher):
    """Sends when the batch is begun (the verdicts come with the wait), like KafkaPublisher."""

    def begin_publish(self, records: Sequence[OutboxRecord], *,
                      timeout: float = 30.0) -> Callable[[], list[PublishResult]]:
        results = self.publish(records, timeout=timeout)
        return lambda: results


class CountingRelay(Relay):
    """Counts the batches claimed ahead that were published (resumed) and those rolled back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed = 0
        self.claimed_ahead = 0

    def _claim_ahead(self, batch: Any) -> Any:
        ahead = super()._claim_ahead(batch)
        self.claimed_ahead += ahead is not None
        return ahead

    def _resume(self, ahead: Any, *, whole: bool) -> Any:
        got = super()._resume(ahead, whole=whole)
        self.resumed += got is not None
        return got


@pytest.fixture
def pg(dialect_name: str, engine: sa.Engine) -> sa.Engine:
    return postgresql_only(dialect_name, engine, "pipelined claims are PostgreSQL's (supports_pipelined_claims)")


def add(engine: sa.Engine, n: int, keys: int) -> dict[int, int]:
    """``n`` messages over ``keys`` keys in one transaction; returns seq -> row id."""
    with Session(engine) as s, s.begin():
        Outbox().add_many(s, [OutgoingMessage("orders", {"seq": i}, key=f"k{i % keys}") for i in range(n)])
    with engine.connect() as c:
        return {json.loads(bytes(p))["seq"]: i for i, p in c.execute(sa.select(T.c.id, T.c.payload))}


def sends_by_key(pub: MemoryPublisher) -> dict[str, list[int]]:
    """Every send (delivered or not, in send order) per key, as seq numbers."""
    out: dict[str, list[int]] = {}
    for m in pub.snapshot():
        out.setdefault(m.key or "", []).append(json.loads(m.payload)["seq"])
    return out


def test_a_pipelined_drain_claims_ahead_and_keeps_every_key_in_order(pg: sa.Engine) -> None:
    add(pg, 2000, keys=37)
    pub = TwoStepPublisher()
    relay = CountingRelay(pg, pub, config=RelayConfig(**FAST))
    assert relay.drain() == 2000
    relay.close()
    assert relay.resumed >= 5, "no batch was claimed while the previous one waited for the broker"
    seqs = sorted(json.loads(m.payload)["seq"] for m in pub.snapshot())
    assert seqs == list(range(2000))  # each once
    for key, got in sends_by_key(pub).items():
        assert got == sorted(got), f"key {key} out of order"
    with pg.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 0


def test_a_publisher_wrapped_after_construction_is_used_and_keeps_the_pipeline(pg: sa.Engine) -> None:
    """``outbox relay --http`` wraps the relay's publisher in the metrics decorator after the relay is
    built: the relay must send through the wrapper (or nothing is counted) and still pipeline."""
    pytest.importorskip("prometheus_client")
    from outbox.observability.metrics import MetricsPublisher, RelayMetrics

    add(pg, 1000, keys=11)
    relay = CountingRelay(pg, TwoStepPublisher(), config=RelayConfig(**FAST))
    metrics = RelayMetrics()
    relay.publisher = MetricsPublisher(relay.publisher, metrics)
    assert relay.drain() == 1000
    relay.close()
    assert relay.resumed >= 3, "the wrapped publisher lost the pipeline"
    counted = metrics.registry.get_sample_value("outbox_relay_messages_published_total", {"topic": "orders"})
    assert counted == 1000, f"the metrics decorator counted {counted} of 1000 published"


def test_pipelining_off_claims_nothing_ahead(pg: sa.Engine) -> None:
    add(pg, 500, keys=7)
    relay = CountingRelay(pg, TwoStepPublisher(), config=RelayConfig(**FAST, pipeline=False))
    assert relay.drain() == 500
    relay.close()
    assert relay.claimed_ahead == 0


@pytest.mark.parametrize("refresh", ["default", "every_claim"])
@pytest.mark.parametrize("outcome", [Outcome.RETRY, Outcome.FAILED])
def test_a_failure_in_a_batch_rolls_back_the_batch_claimed_ahead_unpublished(
        pg: sa.Engine, outcome: Outcome, refresh: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 50 (key k0) fails in the first batch; the batch claimed ahead holds k0's later rows 150, 250, ...

    They must not go out before row 50 is settled: the batch claimed ahead is rolled back, and k0's
    later rows wait behind 50 (its retry, or its dead row under strict ordering).

    ``every_claim``: the look-up of delayed rows runs in every claim, the ones made ahead too. The
    retried row's backoff has run out, so the sequential claim promotes it (its transaction holds
    the row's lock) and a claim ahead that tried to promote it again would wait on that
    transaction, which waits on it, until the server ended the session (idle-in-transaction)."""
    if refresh == "every_claim":
        monkeypatch.setattr("outbox.relay.REFRESH", 0.0)
    ids = add(pg, 1000, keys=50)
    pub = TwoStepPublisher()
    pub.fail(lambda r: r.id == ids[50], outcome, "broker said no", times=1)
    relay = CountingRelay(pg, pub, config=RelayConfig(**FAST, publish_timeout=2.0, lease_ttl=2.0))
    relay.run_once()
    assert relay.claimed_ahead == 1 and relay.resumed == 0  # claimed ahead, then rolled back
    assert k0_sends(pub) == [0], "a later row of the failed row's key went out"
    if outcome is Outcome.RETRY:  # its backoff runs out now
        with pg.begin() as c:
            c.execute(T.update().where(T.c.id == ids[50]).values(
                available_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    relay.drain()
    relay.close()
    if outcome is Outcome.RETRY:
        assert k0_sends(pub) == list(range(0, 1000, 50))  # 50 again, then the rest, in order
    else:
        assert k0_sends(pub) == [0]  # 50 is dead: strict ordering holds k0's later rows behind it
    for key, got in sends_by_key(pub).items():
        assert got == sorted(got), f"key {key} out of order"


def k0_sends(pub: MemoryPublisher) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in pub.snapshot() if m.key == "k0"]


def test_an_undecodable_row_of_a_batch_claimed_ahead_and_rolled_back_is_counted_and_logged_once(
        pg: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    """The claim made ahead marks its undecodable rows dead in its own transaction; when that claim is
    rolled back (here: the batch in flight was not delivered whole), the marks are undone and the next
    claim marks those rows dead again. Only the committed mark may count (``stats.dead``, the log line)."""
    n, first = 300, 30  # batches of 30, fewer than the 32 partitions: claimed in id order
    with Session(pg) as s, s.begin():  # the rows after the first batch on keys of their own: strict
        # ordering holds nothing back behind a dead one, so every bad row is reached
        Outbox().add_many(s, [OutgoingMessage("orders", {"seq": i}, key=f"k{i % 10}" if i < first else f"u{i}")
                              for i in range(n)])
    with pg.connect() as c:
        ids = {json.loads(bytes(p))["seq"]: i for i, p in c.execute(sa.select(T.c.id, T.c.payload))}
    bad = {ids[i] for i in range(first + 1, n, 2)}  # good and bad rows mixed in every batch after the first
    with pg.begin() as c:
        c.execute(sa.text("UPDATE outbox_messages SET headers = '\"x\"'::jsonb WHERE id = ANY(:ids)"),
                  {"ids": sorted(bad)})
    pub = TwoStepPublisher()
    pub.fail(lambda r: r.id == ids[0], Outcome.RETRY, "broker said no", times=1)  # the first batch's first row
    relay = CountingRelay(pg, pub, config=RelayConfig(**{**FAST, "batch_size": first}))
    with caplog.at_level(logging.ERROR, logger="outbox.relay"):
        relay.run_once()
        assert relay.claimed_ahead == 1 and relay.resumed == 0  # claimed ahead, then rolled back
        relay.drain()
    relay.close()
    with pg.connect() as c:
        dead = set(c.execute(sa.select(T.c.id).where(T.c.status == "dead")).scalars())
    assert dead == bad
    # read from the message: the log's repeat filter rewrites a line an earlier test of this worker
    # logged too (same row id) as "... (repeated N times in S s)", without its args
    logged = [int(m.group(1)) for r in caplog.records if (m := re.match(r"row (\d+) marked dead", r.getMessage()))]
    assert sorted(logged) == sorted(bad), f"{len(logged)} log lines for {len(bad)} dead rows"
    assert relay.stats.dead == len(bad)


def test_a_claim_made_ahead_never_waits_on_a_row_the_batch_in_flight_promoted(pg: sa.Engine) -> None:
    """A retried row whose backoff ran out is promoted (``available_at = DUE_NOW``) and claimed by the
    sequential claim, whose transaction then holds its lock while the batch is out. If the send takes
    longer than the delayed-row look-up interval (``REFRESH``), the claim made ahead looks again and
    finds the row still delayed in its snapshot; had it promoted it too, its UPDATE would wait on the
    batch in flight's transaction, which waits on it (the same thread), until the server ended the
    session. With the default settings: only the send is slow. ``lock_timeout`` makes such a wait an
    error at once instead of a stall."""
    import outbox.relay as relay_module

    ids = add(pg, 300, keys=300)
    retried = ids[0]  # the first batch's first row, tried once, its backoff over
    with pg.begin() as c:
        c.execute(T.update().where(T.c.id == retried).values(
            attempts=1, available_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))

    class SlowSend(TwoStepPublisher):
        def begin_publish(self, records: Sequence[OutboxRecord], *,
                          timeout: float = 30.0) -> Callable[[], list[PublishResult]]:
            time.sleep(2 * relay_module.REFRESH)  # the send itself is slow (a broker applying back-pressure)
            return super().begin_publish(records, timeout=timeout)

    pub = SlowSend()
    relay = CountingRelay(pg, pub, config=RelayConfig(**FAST))

    @sa.event.listens_for(relay.engine, "connect")
    def _lock_timeout(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET lock_timeout = '1s'")
        dbapi_conn.commit()

    try:
        assert relay.drain(timeout=60) == 300
    except sa.exc.DBAPIError as exc:
        pytest.fail(f"the claim made ahead waited on a row the batch in flight holds: {exc.orig}")
    finally:
        relay.close()
    assert relay.resumed >= 1, "nothing was claimed ahead: the test did not exercise the pipeline"
    seqs = sorted(json.loads(m.payload)["seq"] for m in pub.snapshot())
    assert seqs == list(range(300))


@pytest.mark.parametrize("batch_size", [2, 32], ids=["full_batch", "quota_of_one"])
def test_rows_the_batch_in_flight_promoted_but_did_not_claim_are_not_overtaken_by_a_claim_made_ahead(
        pg: sa.Engine, batch_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows 0-2 of key k0 were retried and their backoff is over; rows 3-5 were never tried.

    The first claim promotes 0-2 (``available_at = DUE_NOW``, its transaction holds their locks)
    and takes fewer of them than it promoted: a full batch of 2 (``full_batch``, the claim joined
    back by id, as on main), or the one row the claim by quotas asks of each of 32 partitions when
    ``batch_size`` equals the partition count (``quota_of_one``). The claim made ahead while that
    batch is out reads the partition after the batch's last row under its own snapshot, in which
    the rest of the promoted rows are still delayed: not locked, simply not due, so SKIP LOCKED
    and the gap check see nothing. It must not take 3-5 past them.

    ``REFRESH`` is raised so that the claim made ahead never looks for delayed rows itself (which
    would make it step back by chance, on a slow machine)."""
    monkeypatch.setattr("outbox.relay.REFRESH", 3600.0)
    ids = add(pg, 6, keys=1)
    with pg.begin() as c:
        c.execute(T.update().where(T.c.id.in_([ids[0], ids[1], ids[2]])).values(
            attempts=1, available_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    pub = TwoStepPublisher()
    relay = CountingRelay(pg, pub, config=RelayConfig(**{**FAST, "batch_size": batch_size}))
    assert relay.drain(timeout=60) == 6
    relay.close()
    assert k0_sends(pub) == list(range(6)), "a claim made ahead overtook rows the batch in flight promoted"


def test_a_pool_of_one_connection_drains_without_claiming_ahead(
        pg: sa.Engine, caplog: pytest.LogCaptureFixture) -> None:
    """The application's engine may have a pool of one connection (``pool_size=1, max_overflow=0``),
    and the relay's own pool copies its settings. The batch in flight holds that connection, so a
    claim made ahead cannot get a second one: it must be skipped, not fail the round. Before, the
    claim waited out the pool timeout and raised, the batch already sent was rolled back, and every
    later round did the same: nothing was ever marked and the first batch went out again and again."""
    add(pg, 500, keys=7)
    small = sa.create_engine(pg.url, pool_size=1, max_overflow=0, pool_timeout=0.5)
    pub = TwoStepPublisher()
    relay = CountingRelay(small, pub, config=RelayConfig(**FAST))
    try:
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="outbox.relay"):
            assert relay.drain(timeout=20) == 500
        took = time.monotonic() - began
    finally:
        relay.close()
        small.dispose()
    sent = [json.loads(m.payload)["seq"] for m in pub.snapshot()]
    assert sorted(sent) == list(range(500)), f"{len(sent)} sends for 500 rows"  # each once
    assert relay.claimed_ahead == 0
    assert took < 5, f"the drain took {took:.1f} s: each round waited for a connection"
    warned = [r.getMessage() for r in caplog.records if "no connection to spare" in r.getMessage()]
    assert len(warned) == 1 and "pool_size=2" in warned[0], warned
    with pg.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T)).scalar_one() == 0


def test_a_claim_ahead_that_fails_leaves_the_batch_in_flight_to_be_marked(
        pg: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim made ahead runs on a second connection. If it fails (here: the server ends that
    connection's session as it starts), the batch already sent is still waited for and marked on its
    own connection, as a relay without pipelining would: nothing is sent twice, and the drain goes on."""
    add(pg, 500, keys=7)
    pub = TwoStepPublisher()
    relay = CountingRelay(pg, pub, config=RelayConfig(**FAST))
    real = relay._claim_rows
    killed: list[int] = []

    def claim_rows(conn: Any, *args: Any, ahead: bool = False, **kwargs: Any) -> Any:
        if ahead and not killed:  # the first claim made ahead: its session is ended by the server
            killed.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
            with pg.connect() as other:
                other.exec_driver_sql(f"SELECT pg_terminate_backend({killed[0]})")
        return real(conn, *args, ahead=ahead, **kwargs)

    monkeypatch.setattr(relay, "_claim_rows", claim_rows)
    try:
        assert relay.drain(timeout=20) == 500
    finally:
        relay.close()
    assert killed, "no claim was made ahead"
    sent = [json.loads(m.payload)["seq"] for m in pub.snapshot()]
    assert sorted(sent) == list(range(500)), f"{len(sent)} sends for 500 rows: a batch went out twice"
    for key, got in sends_by_key(pub).items():
        assert got == sorted(got), f"key {key} out of order"
