"""Broker links that stall, drop or sit idle: the relay recovers by itself, quickly, without tracebacks.

- a Kafka link paused for longer than the producer's ``message.timeout.ms`` (issue 9, item 1);
- a RabbitMQ connection left idle for several heartbeat intervals, and one cut mid-run;
- a missing Kafka topic created after its rows were written (retried, not dead at once);
- Kafka's size limit: 1,000,000 bytes are delivered, more become dead with ``MSG_SIZE_TOO_LARGE``;
- a RabbitMQ row with an empty topic: dead, not routed through the default exchange.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from outbox.brokers import KafkaPublisher, Outcome, RabbitMQPublisher
from outbox.devbroker import free_port
from outbox.errors import BrokerUnavailable
from outbox.message import OutboxRecord
from tests._proxy import FaultProxy
from tests.faults._harness import OwnTansu

from .conftest import (
    TABLES,
    Db,
    KafkaReader,
    create_topic,
    declare_queue,
    first_occurrences_in_order,
    relay_args,
    wait_until,
    write,
)

# ------------------------------------------------------------------ a link that can be paused


class ProxiedTansu:
    """A tansu of its own that advertises the proxy's port, so every byte a client sends passes the proxy."""

    def __init__(self, log_path: Path) -> None:
        direct_port = free_port()
        self.proxy = FaultProxy("127.0.0.1", direct_port, refusing=True)  # pause() / resume()
        self.tansu = OwnTansu(log_path, port=direct_port, advertised_port=self.proxy.port).start()
        self.proxy.accept()

    @property
    def bootstrap(self) -> str:
        """Through the proxy (the advertised address)."""
        return self.tansu.bootstrap

    def close(self) -> None:
        self.proxy.close()
        self.tansu.stop()


@pytest.fixture
def proxied_tansu(tmp_path: Path) -> Iterator[ProxiedTansu]:
    broker = ProxiedTansu(tmp_path / "tansu-proxied.log")
    yield broker
    broker.close()


def _read_all(bootstrap: str, topic: str, expected: set[int], timeout: float) -> list[Any]:
    """What reached ``topic``, read after the drain with a fresh consumer (tansu misses records read live)."""
    reader = KafkaReader(bootstrap, topic)
    try:
        return reader.wait_seqs(expected, timeout)
    finally:
        reader.close()


def _attempts(d: Db) -> list[int]:
    o = TABLES.outbox
    with d.engine.connect() as c:
        return [int(a) for a in c.execute(sa.select(o.c.attempts).where(o.c.status == "pending")).scalars()]


class _Errors(logging.Handler):
    """Collects WARNING+ records of the ``outbox`` loggers, tracebacks included."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" + (" [traceback]" if r.exc_info else "")
                         for r in self.records)


@pytest.fixture
def outbox_errors() -> Iterator[_Errors]:
    handler = _Errors()
    root = logging.getLogger("outbox")
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


# ------------------------------------------------------------------ Kafka: a pause longer than message.timeout.ms


@pytest.mark.kafka
def test_kafka_link_paused_longer_than_message_timeout(db, proxied_tansu, thread_relay):
    """Reported: after a pause longer than message.timeout.ms every retry failed with PRODUCER_FENCED."""
    d = db("postgresql")
    topic = f"pause-{uuid.uuid4().hex[:8]}"
    create_topic(proxied_tansu.bootstrap, topic)
    timeout_ms = 2000
    publisher = KafkaPublisher(bootstrap_servers=proxied_tansu.bootstrap, message_timeout_ms=timeout_ms,
                               connect_timeout=5, config={"log_level": 3, "reconnect.backoff.max.ms": 500})
    n, keys = 6000, 50
    write(d.engine, topic, range(n // 2), keys=keys)
    relay = thread_relay(d.engine, publisher, batch_size=200, publish_timeout=10.0, backoff_initial=1.0)
    wait_until(lambda: d.rows() < n // 2 - 200, 60, "the relay to publish the first messages")

    proxy = proxied_tansu.proxy
    proxy.pause()
    write(d.engine, topic, range(n // 2, n), keys=keys)  # committed while the link is stalled
    paused_at = time.monotonic()
    # five message timeouts: every message in flight expires, then the relay keeps trying
    wait_until(lambda: time.monotonic() - paused_at > 5 * timeout_ms / 1000, 30, "the pause")
    assert d.rows() > 0, "the backlog was done before the pause"
    worst = max(_attempts(d), default=0)
    assert worst <= 1, f"a broker-wide stall counted {worst} attempts against rows"
    proxy.resume()
    resumed = time.monotonic()

    wait_until(lambda: d.rows() == 0, 45, "the backlog to drain after the link came back")
    drained_in = time.monotonic() - resumed
    assert drained_in < 45
    assert relay.stats.dead == 0 and d.dead_rows() == []
    got = _read_all(proxied_tansu.bootstrap, topic, set(range(n)), timeout=60)
    first_occurrences_in_order(got)


@pytest.mark.kafka
def test_kafka_messages_without_an_acknowledgement_are_never_reported_delivered(proxied_tansu):
    """The publisher hears only of failed messages (``delivery.report.only.error``) and takes a queued
    message without a report as delivered only once the producer holds nothing. A link paused
    mid-batch leaves the batch, and the next one queued behind it, in the producer unacknowledged:
    neither may come back DELIVERED. Once the link is back, the next batch is delivered."""
    topic = f"unacked-{uuid.uuid4().hex[:8]}"
    create_topic(proxied_tansu.bootstrap, topic)
    pub = KafkaPublisher(bootstrap_servers=proxied_tansu.bootstrap, message_timeout_ms=20_000, connect_timeout=5,
                         config={"log_level": 0})
    ids = iter(range(1, 1_000_000))

    def batch(n: int) -> list[OutboxRecord]:
        return [OutboxRecord(id=next(ids), message_id=uuid.uuid4(), topic=topic, key=f"k{i % 3}", payload=b"{}")
                for i in range(n)]

    try:
        assert {r.outcome for r in pub.publish(batch(5), timeout=30)} == {Outcome.DELIVERED}
        proxied_tansu.proxy.pause()
        for _ in range(2):  # the second batch finds the first's messages in flight still in the producer
            try:
                results = pub.publish(batch(20), timeout=1.0)
            except BrokerUnavailable:
                continue  # raised only for a batch of which nothing was delivered
            assert [r.outcome for r in results] == [Outcome.RETRY] * 20, results
        proxied_tansu.proxy.resume()
        results = pub.publish(batch(20), timeout=30)
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 20, results
    finally:
        proxied_tansu.proxy.resume()
        pub.close(timeout=5)


# ------------------------------------------------------------------ Kafka: a topic created after its rows


def _topic_attempts(d: Db, topic: str) -> int:
    o = TABLES.outbox
    with d.engine.connect() as c:
        return int(c.execute(sa.select(sa.func.coalesce(sa.func.max(o.c.attempts), 0))
                             .where(o.c.topic == topic)).scalar_one())


@pytest.mark.kafka
def test_kafka_rows_for_a_missing_topic_are_retried_then_delivered_once_it_exists(
        db, kafka_bootstrap, kafka_topic, thread_relay, outbox_errors):
    """Reported: a missing topic made rows dead at once, so a deploy creating it later needed a requeue."""
    d = db("postgresql")
    late = f"late-{uuid.uuid4().hex[:8]}"
    write(d.engine, kafka_topic, range(20), keys=5)
    write(d.engine, late, range(100, 110), keys=2)
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, topic_metadata_timeout_ms=500)
    relay = thread_relay(d.engine, pub, backoff_initial=0.3, backoff_max=1.0, max_attempts=1000)

    wait_until(lambda: _topic_attempts(d, late) >= 3, 60, "the rows of the missing topic to be retried")
    assert d.dead_rows() == [], "a missing topic made rows dead at once"
    hints = [r.getMessage() for r in outbox_errors.records if late in r.getMessage()]
    assert len(hints) == 1, f"the missing topic should be reported once per interval, got {hints}"
    assert "create it" in hints[0] and "allow.auto.create.topics" in hints[0]

    create_topic(kafka_bootstrap, late)
    wait_until(lambda: d.rows() == 0, 60, "the rows to be delivered once the topic exists")
    assert relay.stats.dead == 0
    _read_all(kafka_bootstrap, late, set(range(100, 110)), timeout=30)
    _read_all(kafka_bootstrap, kafka_topic, set(range(20)), timeout=30)


# ------------------------------------------------------------------ Kafka: the writer's limit is the producer's


def _payload_sizes(bootstrap: str, topic: str, n: int, timeout: float) -> list[int]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"size-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "log_level": 0})
    try:
        parts = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        sizes: list[int] = []
        deadline = time.monotonic() + timeout
        while len(sizes) < n and time.monotonic() < deadline:
            sizes += [len(m.value() or b"") for m in consumer.consume(100, 0.5) if not m.error()]
        return sizes
    finally:
        consumer.close()


@pytest.mark.kafka
def test_kafka_delivers_the_writers_largest_payload_and_rejects_a_larger_one(db, kafka_bootstrap, kafka_topic,
                                                                             thread_relay):
    """Reported: the writer accepted up to 1 MiB, librdkafka only 1,000,000 bytes: payloads in between went dead."""
    from sqlalchemy.orm import Session

    from outbox import Outbox

    d = db("postgresql")
    box = Outbox(max_payload_bytes=2_000_000)  # the larger one bypasses the writer's default limit
    with Session(d.engine) as s, s.begin():
        box.add(s, kafka_topic, b"x" * 1_000_000, key="fits", content_type="application/octet-stream")
        box.add(s, kafka_topic, b"y" * 1_100_000, key="too-big")
    thread_relay(d.engine, KafkaPublisher(bootstrap_servers=kafka_bootstrap))

    wait_until(lambda: d.rows() == len(d.dead_rows()) == 1, 60, "one message delivered and one dead")
    (dead,) = d.dead_rows()
    assert dead.key == "too-big"
    assert "MSG_SIZE_TOO_LARGE" in dead.last_error
    assert _payload_sizes(kafka_bootstrap, kafka_topic, 1, timeout=30) == [1_000_000]


# ------------------------------------------------------------------ RabbitMQ: idle for several heartbeats


def _quiet(log: str) -> list[str]:
    """Lines of a relay log that show an error, a traceback or a lost connection."""
    bad = ("ERROR", "Traceback", "CRITICAL", "connection lost", "ConnectionReset", "StreamLost")
    return [line for line in log.splitlines() if any(b in line for b in bad)]


@pytest.mark.rabbitmq
def test_rabbitmq_relay_idle_for_several_heartbeats_then_publishes_quietly(db, rabbitmq_url, amqp_names,
                                                                          rabbit_reader, start_relay):
    """Reported: idle ~3.5 min, the connection was lost (heartbeats not serviced): tracebacks on publish and SIGTERM."""
    d = db("postgresql")
    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    declare_queue(rabbitmq_url, exchange, queue)
    reader = rabbit_reader(rabbitmq_url, queue)
    heartbeat = 2
    relay = start_relay(*relay_args(d.url, "--rabbitmq", rabbitmq_url, poll=1.0,
                                    extra=("-X", f"heartbeat={heartbeat}")), name="rabbit-idle")
    write(d.engine, exchange, range(10), keys=3)
    reader.wait_seqs(set(range(10)), timeout=60)
    wait_until(lambda: d.rows() == 0, 30, "the first rows to be deleted")

    idle_from = time.monotonic()
    # RabbitMQ closes a connection that misses two heartbeats; stay idle for four times that.
    wait_until(lambda: time.monotonic() - idle_from > 8 * heartbeat, 60, "the idle period", interval=0.5)
    assert relay.alive, relay.log()[-3000:]
    write(d.engine, exchange, range(10, 20), keys=3)
    reader.wait_seqs(set(range(20)), timeout=60)
    wait_until(lambda: d.rows() == 0, 30, "the rows written after the idle period to be deleted")
    assert _quiet(relay.log()) == [], relay.log()[-3000:]

    wait_until(lambda: time.monotonic() - idle_from > 16 * heartbeat, 60, "a second idle period", interval=0.5)
    assert relay.stop() == 0
    assert _quiet(relay.log()) == [], relay.log()[-3000:]


@pytest.mark.rabbitmq
def test_rabbitmq_link_cut_mid_run_recovers_without_tracebacks(db, rabbitmq_url, amqp_names, rabbit_reader,
                                                              start_relay, fault_proxy):
    d = db("mariadb")
    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    declare_queue(rabbitmq_url, exchange, queue)
    real = urlsplit(rabbitmq_url)
    proxy = fault_proxy(real.hostname or "127.0.0.1", real.port or 5672)
    proxied = proxy.url(rabbitmq_url)
    n = 3000
    write(d.engine, exchange, range(n), keys=20)
    relay = start_relay(*relay_args(d.url, "--rabbitmq", proxied, batch=100,
                                    extra=("-X", "heartbeat=2", "-X", "connect_timeout=2")), name="rabbit-cut")
    wait_until(lambda: d.rows() < n - 300, 60, "the first messages to be delivered")

    proxy.outage()  # drops the live connection and refuses new ones
    # down until a reconnect has failed and the relay backs off as a whole
    wait_until(lambda: "broker unavailable" in relay.log(), 60, "the relay to notice the cut and back off")
    assert d.rows() > 0, "the backlog was done before the cut"
    o = TABLES.outbox
    with d.engine.connect() as c:
        charged = c.execute(sa.select(sa.func.count()).select_from(o).where(o.c.attempts > 1)).scalar_one()
    # the batch in flight when the link went may be charged one attempt (some of it got through, so
    # it is not yet "the broker is unreachable"); from then on the relay backs off as a whole
    assert charged == 0, f"an outage of the whole broker counted more than one attempt against {charged} rows"
    proxy.accept()

    reader = rabbit_reader(rabbitmq_url, queue)
    got = reader.wait_seqs(set(range(n)), timeout=120)
    first_occurrences_in_order(got)
    wait_until(lambda: d.rows() == 0, 60, "every row to be deleted")
    assert d.dead_rows() == []
    assert relay.alive
    assert relay.stop() == 0
    log = relay.log()
    assert "Traceback" not in log and "CRITICAL" not in log, log[-3000:]


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_relay_daemon_recovers_by_itself_after_a_long_pause(db, proxied_tansu, start_relay):
    """The reported run, smaller: the `outbox relay` daemon, a backlog, a pause of many message timeouts."""
    d = db("mariadb")
    topic = f"pause-cli-{uuid.uuid4().hex[:8]}"
    create_topic(proxied_tansu.bootstrap, topic)
    n, keys = 10_000, 100
    write(d.engine, topic, range(n), keys=keys)
    extra = ("-X", "message.timeout.ms=2000", "-X", "reconnect.backoff.max.ms=500", "-X", "log_level=3")
    relay = start_relay(*relay_args(d.url, "--kafka", proxied_tansu.bootstrap, batch=500, extra=extra),
                        name="kafka-paused")
    wait_until(lambda: d.rows() < n - 1000, 60, "the relay to publish the first messages")

    proxied_tansu.proxy.pause()
    paused_at = time.monotonic()
    wait_until(lambda: time.monotonic() - paused_at > 12, 30, "the pause")
    assert d.rows() > 0, "the backlog was done before the pause"
    assert max(_attempts(d), default=0) <= 1, "a stalled link counted attempts against rows"
    proxied_tansu.proxy.resume()

    wait_until(lambda: d.rows() == 0, 60, "the backlog to drain after the link came back")
    got = _read_all(proxied_tansu.bootstrap, topic, set(range(n)), timeout=60)
    first_occurrences_in_order(got)
    assert d.dead_rows() == []
    assert relay.stop() == 0
    assert "Traceback" not in relay.log(), relay.log()[-3000:]


# ------------------------------------------------------------------ RabbitMQ: a row with an empty topic


@pytest.mark.rabbitmq
def test_rabbitmq_row_with_an_empty_topic_is_dead_not_sent_to_the_queue_named_by_its_key(
        db, rabbitmq_url, amqp_names, rabbit_reader, thread_relay):
    """Reported: an empty topic went through the default exchange to the queue named by the key."""
    d = db("sqlite")
    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    declare_queue(rabbitmq_url, exchange, queue, binding="ok.#")
    (stray,) = write(d.engine, exchange, [1], key=queue)  # the key names the queue
    write(d.engine, exchange, range(2, 12), key="ok.a")
    o = TABLES.outbox
    with d.engine.begin() as c:  # hand-edited: the writer refuses an empty topic
        c.execute(o.update().where(o.c.message_id == stray).values(topic=""))
    reader = rabbit_reader(rabbitmq_url, queue)
    thread_relay(d.engine, RabbitMQPublisher(url=rabbitmq_url))

    reader.wait_seqs(set(range(2, 12)), timeout=60)
    wait_until(lambda: d.dead_rows(), 30, "the row with the empty topic to be marked dead")
    (dead,) = d.dead_rows()
    # the relay's row check (outbox/_rows.py) refuses it before any broker sees it; a Publisher used
    # directly refuses it too ("empty exchange name: ...", tests/contract/test_rabbitmq_publisher.py)
    assert dead.key == queue and "topic must be non-empty text" in dead.last_error
    assert 1 not in reader.seqs()
