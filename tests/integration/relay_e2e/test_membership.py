"""Relay membership (issue 9, items 6 and 7), with real ``outbox relay`` subprocesses.

- A relay restarted right after a crash waits for (or, same host and dead pid, takes over at once)
  its predecessor's row instead of exiting; a second SQLite relay waits as a standby.
- A relay id held by a live other process is refused at start, and detected while running.
- Relay groups: relays publishing to different brokers never split one stream.
"""

from __future__ import annotations

import signal
import time

import pytest
import sqlalchemy as sa

from outbox import default_tables
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.errors import ConfigurationError, RelayGroupConflict
from outbox.leases import topics_overlap
from outbox.relay import Relay

from .conftest import cli_json, declare_queue, relay_args, run_cli, wait_until, write

TTL = 3.0
EXITED = 60  # seconds a refusing relay may take to exit (it watches a heartbeat for up to a lease)


@pytest.fixture
def rabbit(rabbitmq_url, amqp_names, rabbit_reader):
    """(broker args, exchange, reader) of a fresh exchange with a queue bound to every key."""
    declare_queue(rabbitmq_url, amqp_names["exchange"], amqp_names["queue"])
    return ("--rabbitmq", rabbitmq_url), amqp_names["exchange"], rabbit_reader(rabbitmq_url, amqp_names["queue"])


def _exit_code(relay, what: str) -> int:
    wait_until(lambda: not relay.alive, EXITED, what)
    return int(relay.proc.returncode)


def _registered(d, relay_id: str | None = None) -> bool:
    ids = d.relay_ids()
    return bool(ids) if relay_id is None else relay_id in ids


# ------------------------------------------------------------------ item 6: restarts


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_relay_restarted_at_once_after_sigkill_takes_over_instead_of_exiting(dialect, db, rabbit, start_relay):
    """SIGKILL, restart at once: the new process sees its predecessor's live-looking row, finds the pid
    gone on this host and takes over at once (before: SQLite exited "another relay ... is running")."""
    d = db(dialect)
    broker, exchange, reader = rabbit
    # SQLite: the default relay id (a new one per process, as under systemd); PostgreSQL: a fixed id
    rid = None if dialect == "sqlite" else "fixed-id"
    write(d.engine, exchange, range(100))
    r1 = start_relay(*relay_args(d.url, *broker, relay_id=rid, lease_ttl=TTL * 5), name="r1")
    reader.wait_seqs(set(range(100)), 60)
    r1.kill()
    write(d.engine, exchange, range(100, 200))
    r2 = start_relay(*relay_args(d.url, *broker, relay_id=rid, lease_ttl=TTL * 5), name="r2")
    reader.wait_seqs(set(range(200)), 60)
    assert r2.alive, r2.log()[-3000:]
    # at once: not after the 15 s lease the dead relay left behind
    assert "is gone (no such process on this host): taking over at once" in r2.log()
    assert "waiting up to" not in r2.log() and "standby" not in r2.log()
    assert r2.stop() == 0, r2.log()[-3000:]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_frozen_predecessor_with_the_same_id_is_waited_out_and_stops_when_it_wakes(dialect, db, rabbit,
                                                                                   start_relay):
    """A process with our relay id that is alive but silent (SIGSTOP): the new relay says what it waits
    for, takes over when the row expires; the old one, woken, finds its row taken and exits non-zero."""
    d = db(dialect)
    broker, exchange, reader = rabbit
    # slack for a loaded machine: r2 must start before r1's row expires to find something to wait for
    # (with 3 s, r2's start-up alone sometimes outlasted it); if r1 froze inside its claim transaction,
    # r2 also waits for the database to end it (RelayConfig.idle_transaction_timeout, 36 s here)
    args = relay_args(d.url, *broker, relay_id="same", lease_ttl=TTL * 2)
    write(d.engine, exchange, range(50))
    r1 = start_relay(*args, name="r1")
    reader.wait_seqs(set(range(50)), 60)
    r1.proc.send_signal(signal.SIGSTOP)
    try:
        r2 = start_relay(*args, name="r2")
        wait_until(lambda: "to expire: its last heartbeat was" in r2.log(), 30, "r2 to say what it waits for")
        assert "waiting up to" in r2.log() and f"pid {r1.proc.pid}" in r2.log()
        write(d.engine, exchange, range(50, 100))
        reader.wait_seqs(set(range(100)), 60)  # r2 took over after the lease ran out
        assert r2.alive, r2.log()[-3000:]
    finally:
        r1.proc.send_signal(signal.SIGCONT)
    assert _exit_code(r1, "the woken duplicate to stop") != 0, r1.log()[-3000:]
    assert "was taken over by another process" in r1.log()
    write(d.engine, exchange, range(100, 150))
    reader.wait_seqs(set(range(150)), 60)
    assert r2.alive and r2.stop() == 0, r2.log()[-3000:]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mariadb"])
def test_a_second_relay_with_a_live_relays_id_is_refused(dialect, db, rabbit, start_relay):
    d = db(dialect)
    broker, exchange, reader = rabbit
    args = relay_args(d.url, *broker, relay_id="twin", lease_ttl=TTL * 2)  # slack for a loaded machine
    r1 = start_relay(*args, name="r1")
    wait_until(lambda: _registered(d, "twin"), 30, "r1 to register")
    r2 = start_relay(*args, name="r2")
    assert _exit_code(r2, "the duplicate to be refused") != 0
    assert "is in use by another live relay" in r2.log(), r2.log()[-3000:]
    assert "--relay-id" in r2.log()
    write(d.engine, exchange, range(300))
    got = reader.wait_seqs(set(range(300)), 60)
    wait_until(lambda: d.rows() == 0, 30, "every row to be deleted")
    reader.poll(0.5)
    assert len(got) == 300, "duplicates were sent"
    assert r1.alive and r1.stop() == 0, r1.log()[-3000:]


def test_sqlite_second_relay_is_a_standby_and_takes_over_when_the_first_stops(db, rabbit, start_relay):
    d = db("sqlite")
    broker, exchange, reader = rabbit
    r1 = start_relay(*relay_args(d.url, *broker, lease_ttl=TTL * 2), name="r1")
    wait_until(lambda: _registered(d), 30, "r1 to register")
    (first_id,) = d.relay_ids()
    r2 = start_relay(*relay_args(d.url, *broker, lease_ttl=TTL * 2), name="r2")
    wait_until(lambda: "standby:" in r2.log(), 30, "r2 to say it is a standby")
    assert first_id in r2.log()
    write(d.engine, exchange, range(100))
    reader.wait_seqs(set(range(100)), 60)
    assert r2.alive and d.relay_ids() == [first_id], "the standby must not register next to the live relay"
    assert r1.stop() == 0
    write(d.engine, exchange, range(100, 200))
    reader.wait_seqs(set(range(200)), 60)
    assert r2.alive and len(d.relay_ids()) == 1 and d.relay_ids() != [first_id]
    r3 = start_relay(*relay_args(d.url, *broker, lease_ttl=TTL * 2), name="r3")
    wait_until(lambda: "standby:" in r3.log(), 30, "r3 to say it is a standby")
    assert r3.stop(timeout=15) == 0, r3.log()[-3000:]  # SIGTERM ends the wait at once
    assert r2.stop() == 0, r2.log()[-3000:]


# ------------------------------------------------------------------ item 7: groups


def test_kafka_and_rabbitmq_relays_in_one_group_refuse_to_split_it(db, kafka_bootstrap, kafka_topic, rabbit,
                                                                   start_relay):
    d = db("postgresql")
    rbroker, _exchange, _reader = rabbit
    k = start_relay(*relay_args(d.url, "--kafka", kafka_bootstrap, relay_id="k1", lease_ttl=TTL), name="k1")
    wait_until(lambda: _registered(d, "k1"), 30, "the Kafka relay to register")
    r = start_relay(*relay_args(d.url, *rbroker, relay_id="r1", lease_ttl=TTL), name="r1")
    assert _exit_code(r, "the RabbitMQ relay to be refused") != 0
    log = r.log()
    assert "relay k1" in log and "publishes to kafka" in log and "--group" in log, log[-3000:]
    assert "guest:guest" not in log
    assert k.alive and k.stop() == 0


def test_two_groups_with_disjoint_topics_each_send_their_topics_to_their_broker(db, kafka_bootstrap, kafka_topic,
                                                                                 kafka_reader, rabbit, start_relay):
    d = db("postgresql")
    rbroker, exchange, rreader = rabbit
    n = 400
    k = start_relay(*relay_args(d.url, "--kafka", kafka_bootstrap, relay_id="k1", lease_ttl=TTL,
                                extra=("--group", "kafka", "--topics", kafka_topic)), name="k1")
    r = start_relay(*relay_args(d.url, *rbroker, relay_id="r1", lease_ttl=TTL,
                                extra=("--group", "rabbit", "--topics", exchange)), name="r1")
    wait_until(lambda: {"k1", "r1"} <= set(d.relay_ids()), 30, "both relays to register")
    for start in range(0, n, 50):  # interleaved, on the same keys and partitions
        write(d.engine, kafka_topic, range(start, start + 50), keys=8)
        write(d.engine, exchange, range(start, start + 50), keys=8)
    wait_until(lambda: d.rows() == 0, 120, "every row to be published")
    assert d.dead_rows() == []
    got_r = rreader.wait_seqs(set(range(n)), 30)
    assert {m.topic for m in got_r} == {exchange}
    fresh = kafka_reader(kafka_bootstrap, kafka_topic)  # after the drain, with a fresh consumer (tansu)
    got_k = fresh.wait_seqs(set(range(n)), 60)
    assert {m.topic for m in got_k} == {kafka_topic}

    st = cli_json("status", "--db", d.url)
    rows = {x["relay_id"]: x for x in st["relays"]}
    assert rows["k1"]["relay_group"] == "kafka" and rows["k1"]["broker_kind"] == "kafka"
    assert rows["k1"]["topics"] == kafka_topic
    assert rows["r1"]["relay_group"] == "rabbit" and rows["r1"]["broker_kind"] == "rabbitmq"
    assert rows["r1"]["broker_target"] == "127.0.0.1:5672/%2F"
    assert sorted(st["partition_owners"]["k1"]) == sorted(st["partition_owners"]["r1"]) == list(range(32))
    text = run_cli("status", "--db", d.url)
    assert text.returncode == 0, text.stderr
    assert "group kafka, kafka" in text.stdout and f"topics {exchange}" in text.stdout
    assert "guest" not in text.stdout
    assert k.stop() == 0 and r.stop() == 0


@pytest.mark.parametrize("topics", ["*", "t-*"], ids=["all-topics", "prefix"])
def test_a_group_whose_topics_overlap_another_groups_is_refused(topics, db, kafka_bootstrap, kafka_topic, rabbit,
                                                               start_relay):
    d = db("postgresql")
    rbroker, _exchange, _reader = rabbit
    k = start_relay(*relay_args(d.url, "--kafka", kafka_bootstrap, relay_id="k1", lease_ttl=TTL,
                                extra=("--group", "kafka", "--topics", kafka_topic)), name="k1")
    wait_until(lambda: _registered(d, "k1"), 30, "the Kafka relay to register")
    r = start_relay(*relay_args(d.url, *rbroker, relay_id="r1", lease_ttl=TTL,
                                extra=("--group", "rabbit", "--topics", topics)), name="r1")
    assert _exit_code(r, "the overlapping group to be refused") != 0
    assert "overlap this relay's" in r.log() and "relay k1" in r.log(), r.log()[-3000:]
    assert k.alive and k.stop() == 0


# ------------------------------------------------------------------ in-process: claim filter and rules


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mariadb"])
def test_a_group_claims_only_its_topics_and_prefixes_are_not_like_patterns(dialect, db) -> None:
    d = db(dialect)
    for topic in ("orders_eu", "ordersXeu", "orders_eu.created", "payments"):
        write(d.engine, topic, range(3))
    pub = MemoryPublisher()
    relay = Relay(d.engine, pub, config=RelayConfig(group="g", topics="orders_eu*,payments", lease_ttl=TTL,
                                                    progress_interval=0))
    try:
        assert relay.drain(timeout=60) == 9
    finally:
        relay.close()
    assert {m.topic for m in pub.messages} == {"orders_eu", "orders_eu.created", "payments"}
    o = default_tables().outbox
    with d.engine.connect() as c:
        left = c.execute(sa.select(o.c.topic, sa.func.count()).group_by(o.c.topic)).all()
    assert dict(left) == {"ordersXeu": 3}  # the '_' of the prefix is no wildcard


@pytest.mark.parametrize("dialect", ["postgresql"])
def test_same_group_other_topics_and_other_target_are_refused_in_process(dialect, db) -> None:
    d = db(dialect)
    a = Relay(d.engine, MemoryPublisher(), config=RelayConfig(relay_id="a", topics="x", lease_ttl=TTL),
              broker_target="one:1")
    a.start()
    try:
        b = Relay(d.engine, MemoryPublisher(), config=RelayConfig(relay_id="b", topics="y", lease_ttl=TTL),
                  broker_target="one:1")
        with pytest.raises(RelayGroupConflict, match="same --topics"):
            b.start()
        c = Relay(d.engine, MemoryPublisher(), config=RelayConfig(relay_id="c", topics="x", lease_ttl=TTL),
                  broker_target="two:2")
        with pytest.raises(RelayGroupConflict, match="split between two brokers"):
            c.start()
        ok = Relay(d.engine, MemoryPublisher(), config=RelayConfig(relay_id="ok", topics="x", lease_ttl=TTL),
                   broker_target="one:1")
        ok.start()
        assert set(d.relay_ids()) == {"a", "ok"}
        ok.close()
    finally:
        a.close()


def test_topic_pattern_overlap_and_validation() -> None:
    assert topics_overlap(["*"], ["orders"])
    assert topics_overlap(["orders.*"], ["orders.eu"])
    assert topics_overlap(["orders.*"], ["orders.eu.*"])
    assert topics_overlap(["a", "b"], ["c", "b"])
    assert not topics_overlap(["orders.*"], ["payments.*", "orders"])
    assert not topics_overlap(["orders"], ["orders2"])
    assert RelayConfig(topics=" b*, a ,a").topics == ("a", "b*")
    assert RelayConfig(topics="a,*").topics == ("*",)
    for bad in ("", "a,,b", "a*b", "*a", "a b"):
        with pytest.raises(ConfigurationError):
            RelayConfig(topics=bad)
    for bad_group in ("", "a b", "-x", "x" * 65):
        with pytest.raises(ConfigurationError):
            RelayConfig(group=bad_group)


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_two_conflicting_relays_that_both_joined_are_told_apart_at_renewal(dialect, db, monkeypatch) -> None:
    """The start-time check can be raced (both read before either committed): the renewal catches it,
    and only the relay that joined later stops."""
    d = db(dialect)
    a = Relay(d.engine, MemoryPublisher(), config=RelayConfig(relay_id="a", group="ga", topics="x*", lease_ttl=TTL))
    b = Relay(d.engine, MemoryPublisher(), config=RelayConfig(relay_id="b", group="gb", topics="xy", lease_ttl=TTL))
    a.start()
    try:
        with monkeypatch.context() as m:  # b joins as if it had read the table before a committed
            m.setattr(b.leases, "_check_conflicts", lambda *args, **kw: None)
            b.start()
        a.leases.register()  # a joined first: it carries on
        with pytest.raises(RelayGroupConflict, match=r"overlap .* stopping this relay"):
            b.leases.register()
        assert not b.leases.joined
        a.leases.register()
        assert a.leases.joined
    finally:
        b.close()
        a.close()


def test_sqlite_renewals_never_collide_with_a_busy_writer(db, thread_relay) -> None:
    """Each renewal reads and writes the relays table in one SQLite transaction; with the application
    committing all the while, the renewal must not fail (and restart the relay) on a stale snapshot."""
    d = db("sqlite")
    pub = MemoryPublisher()
    relay = thread_relay(d.engine, pub, lease_ttl=1.5)  # a renewal every 0.5 s
    wait_until(lambda: relay.leases.joined, 30, "the relay to join")
    n, end = 0, time.monotonic() + 6  # a dozen renewals under constant writes
    while time.monotonic() < end:
        write(d.engine, "orders", range(n, n + 5))
        n += 5
    wait_until(lambda: len(pub.messages) >= n, 60, "every message to be published")
    assert relay.stats.errors == 0, "a renewal failed next to a writer"


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--topics", "orders*x", "'*' only at the end"),
    ("--topics", ",", "at least one topic"),
    ("--group", "two words", "group must be"),
])
def test_bad_group_or_topics_flag_is_one_clear_error(flag, value, says, tmp_path) -> None:
    done = run_cli("relay", "--db", f"sqlite:///{tmp_path / 'x.db'}", "--kafka", "127.0.0.1:1", flag, value)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
