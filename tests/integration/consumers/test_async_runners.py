"""AsyncKafkaRunner and AsyncRabbitMQRunner end to end on the real brokers (PostgreSQL through async psycopg;
SQLite through aiosqlite for ``outbox consume``)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from consumers import AsyncKafkaRunner, AsyncRabbitMQRunner, list_dead_letters
from tests._amqp import amqp_publish, queue_depth

from .conftest import AsyncRecorder

PG = pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)


async def until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition`` (a sync callable, run in a thread: it reads the database) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Running:
    """``async with Running(runner)``: ``run()`` as a task; on exit ``stop()`` and await it (its error re-raised)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.runner.run())
        return self

    async def stop(self) -> None:
        self.runner.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None and not self.task.done():
            await self.stop()


@pytest.fixture
async def aengine(async_db_url: str):
    e = create_async_engine(async_db_url)
    yield e
    await e.dispose()


def kitems(n: int, prefix: str = "") -> list[tuple[str | None, str, bytes]]:
    return [(str(uuid.uuid4()), f"key-{i % 7}", json.dumps({"n": i, "p": prefix}).encode()) for i in range(n)]


# ------------------------------------------------------------------ Kafka


@PG
@pytest.mark.kafka
async def test_kafka_processed_duplicate_poison_and_restart(aengine, engine, effects, count_effects, produce, committed,
                                                           kafka_bootstrap, kafka_topic, kafka_config):
    group = f"g-{uuid.uuid4().hex[:8]}"
    good = kitems(30)
    poison = (str(uuid.uuid4()), "key-1", b'{"n": -1}')
    produce(kafka_topic, [*good[:10], poison, *good[10:], good[3], (None, "key-2", b'{"n": -2}')])
    consumer = AsyncRecorder()
    consumer.failing = {poison[0]}

    def runner(c):
        return AsyncKafkaRunner(c, engine=aengine, bootstrap_servers=kafka_bootstrap, topics=[kafka_topic],
                                group_id=group, config=kafka_config, batch_size=8, batch_timeout=0.2)

    async with Running(runner(consumer)) as r:
        await until(lambda: count_effects() == 30 and len(list_dead_letters(engine)) == 2, 60,
                    "30 effects and 2 dead letters")
        await until(lambda: sum(committed(group, kafka_topic).values()) == 33, 30, "every offset committed")
    s = r.runner.stats
    assert s.dead == 2 and s.retries == consumer.max_attempts - 1 and s.duplicates == 1 and s.processed == 30
    for msg_id, _, _ in good:
        assert count_effects(msg_id) == 1
    dead = {d["message_id"]: d for d in list_dead_letters(engine)}
    assert "no message id" in dead[None]["error"]
    assert dead[poison[0]]["attempts"] == consumer.max_attempts and dead[poison[0]]["source"]["broker"] == "kafka"

    # restarted in the same group: only the new messages arrive
    more = kitems(5, "more")
    produce(kafka_topic, more)
    again = AsyncRecorder()
    async with Running(runner(again)) as r2:
        await until(lambda: count_effects() == 35, 60, "35 effects")
    assert sorted(again.calls) == sorted(m[0] for m in more) and r2.runner.stats.duplicates == 0


@PG
@pytest.mark.kafka
async def test_kafka_offsets_wait_for_the_database_commit(db_url, engine, effects, count_effects, produce, committed,
                                                         kafka_bootstrap, kafka_topic, kafka_config, fault_proxy):
    """The database is unreachable: batches fail to commit, are retried, and no offset is committed meanwhile."""
    url = sa.engine.make_url(db_url)
    proxy = fault_proxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.refuse(hangup=True)  # accepts, then hangs up: each try of the runner is counted
    proxied = create_async_engine(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    group = f"g-{uuid.uuid4().hex[:8]}"
    sent = kitems(12)
    produce(kafka_topic, sent)
    runner = AsyncKafkaRunner(AsyncRecorder(), engine=proxied, bootstrap_servers=kafka_bootstrap,
                              topics=[kafka_topic], group_id=group, config=kafka_config, batch_size=50,
                              batch_timeout=0.5)
    runner._db_wait = lambda state: 0.05
    try:
        async with Running(runner):
            await until(lambda: proxy.stats().refused >= 3, 60, "the runner to retry against the outage")
            assert all(o < 0 for o in committed(group, kafka_topic).values())  # nothing committed past
            assert count_effects() == 0
            proxy.accept()
            await until(lambda: sum(committed(group, kafka_topic).values()) == 12, 60, "the offsets after the commit")
        assert count_effects() == 12 and runner.stats.processed == 12
    finally:
        await proxied.dispose()


@PG
@pytest.mark.kafka
async def test_kafka_rebalance_between_two_async_runners(aengine, effects, count_effects, produce, kafka_bootstrap,
                                                         kafka_topic, kafka_config):
    group = f"g-{uuid.uuid4().hex[:8]}"

    def runner():
        return AsyncKafkaRunner(AsyncRecorder(), engine=aengine, bootstrap_servers=kafka_bootstrap,
                                topics=[kafka_topic], group_id=group, config=kafka_config, batch_size=5,
                                batch_timeout=0.1)

    sent = kitems(40, "a")
    produce(kafka_topic, sent)
    first = await Running(runner()).__aenter__()
    try:
        await until(lambda: count_effects() >= 10, 60, "the first runner to start")
        async with Running(runner()) as second:  # joins the group: rebalance
            more = kitems(40, "b")
            await asyncio.to_thread(produce, kafka_topic, more)
            sent += more
            await until(lambda: count_effects() == 80, 90, "80 effects")
            await first.stop()  # leaves the group: rebalance again, the second takes every partition
            last = kitems(40, "c")
            await asyncio.to_thread(produce, kafka_topic, last)
            sent += last
            await until(lambda: count_effects() == 120, 90, "120 effects")
            assert second.runner.stats.processed > 0 and first.runner.stats.processed > 0
            assert len(second.runner.lanes.assigned) == 3
    finally:
        await first.__aexit__()
    for msg_id, _, _ in sent:
        assert count_effects(msg_id) == 1


# ------------------------------------------------------------------ RabbitMQ


publish = amqp_publish


def ritems(n: int) -> list[tuple[str | None, bytes]]:
    return [(str(uuid.uuid4()), json.dumps({"n": i}).encode()) for i in range(n)]


@PG
@pytest.mark.rabbitmq
async def test_rabbitmq_processed_duplicate_poison_and_reconnect(aengine, engine, effects, count_effects, rabbitmq_url,
                                                                 queue, rabbitmq_proxy):
    good = ritems(30)
    poison = (str(uuid.uuid4()), b'{"n": -1}')
    consumer = AsyncRecorder(max_attempts=4, retry_initial=0.05, retry_max=0.2)
    consumer.failing = {poison[0]}
    publish(rabbitmq_url, queue["exchange"], [poison, *good[:15], good[2], (None, b'{"n": -2}')])
    runner = AsyncRabbitMQRunner(consumer, engine=aengine, url=rabbitmq_proxy.url(rabbitmq_url), queue=queue["queue"],
                                 batch_size=5, batch_timeout=0.1)
    async with Running(runner):
        await until(lambda: count_effects() == 15 and len(list_dead_letters(engine)) == 2, 60,
                    "15 effects and 2 dead letters")
        # the rejects reached the broker too (else the cut below can redeliver the poison for more tries)
        await until(lambda: queue_depth(rabbitmq_url, queue["dlq"]) == 2, 30, "both dead letters in the DLQ")
        assert runner.connections == 1
        rabbitmq_proxy.cut_after(0)  # our own proxy, never the shared RabbitMQ: aio-pika reconnects
        await until(lambda: runner.connections >= 2, 60, "a reconnect")
        await asyncio.to_thread(publish, rabbitmq_url, queue["exchange"], good[15:])
        await until(lambda: count_effects() == 30, 60, "30 effects")
        await until(lambda: queue_depth(rabbitmq_url, queue["queue"]) == 0, 30, "an empty queue")
    for msg_id, _ in good:
        assert count_effects(msg_id) == 1
    assert runner.stats.duplicates >= 1 and runner.stats.retries == 3
    dead = {d["message_id"]: d for d in list_dead_letters(engine)}
    assert dead[poison[0]]["attempts"] == 4 and "no message id" in dead[None]["error"]


@PG
@pytest.mark.rabbitmq
async def test_rabbitmq_connection_lost_after_the_commit_redelivers_as_no_ops(aengine, engine, effects, count_effects,
                                                                              rabbitmq_url, queue, rabbitmq_proxy):
    """The batch committed (a dead letter included), then the connection died before the acks/rejects: the acks on
    the lost channel fail (logged), aio-pika reconnects, RabbitMQ redelivers the batch, and it is all no-ops."""
    good = ritems(10)
    poison = (str(uuid.uuid4()), b'{"n": -1}')
    cuts: list[int] = []

    class CutAfterCommit(AsyncRecorder):
        async def process_batch(self, engine, messages, *, before_commit=None):
            outcomes = await super().process_batch(engine, messages, before_commit=before_commit)
            if not cuts and any(o.status.value == "dead" for o in outcomes):
                cuts.append(len(outcomes))
                rabbitmq_proxy.cut_after(0)  # committed, not yet acked/rejected
            return outcomes

    consumer = CutAfterCommit(max_attempts=1)
    consumer.failing = {poison[0]}
    publish(rabbitmq_url, queue["exchange"], [*good[:5], poison, *good[5:]])
    runner = AsyncRabbitMQRunner(consumer, engine=aengine, url=rabbitmq_proxy.url(rabbitmq_url), queue=queue["queue"],
                                 batch_size=20, batch_timeout=0.5)
    async with Running(runner):
        await until(lambda: cuts and runner.connections >= 2, 60, "the cut and a reconnect")
        await until(lambda: queue_depth(rabbitmq_url, queue["queue"]) == 0 and runner.stats.duplicates >= 10, 60,
                    "the redelivered batch settled as duplicates")
        await until(lambda: queue_depth(rabbitmq_url, queue["dlq"]) == 1, 60, "the dead message rejected")
    assert count_effects() == 10 and runner.stats.processed == 10
    dead = list_dead_letters(engine)
    assert [d["message_id"] for d in dead] == [poison[0]] and dead[0]["attempts"] == 2  # written once


@PG
@pytest.mark.rabbitmq
async def test_rabbitmq_nothing_acked_before_the_database_commit(db_url, effects, count_effects, rabbitmq_url, queue,
                                                                 fault_proxy):
    url = sa.engine.make_url(db_url)
    proxy = fault_proxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.refuse(hangup=True)  # accepts, then hangs up: each try of the runner is counted
    proxied = create_async_engine(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    sent = ritems(8)
    publish(rabbitmq_url, queue["exchange"], sent)
    runner = AsyncRabbitMQRunner(AsyncRecorder(), engine=proxied, url=rabbitmq_url, queue=queue["queue"],
                                 batch_size=20, batch_timeout=0.2)
    runner._db_wait = lambda state: 0.05
    try:
        async with Running(runner):
            await until(lambda: proxy.stats().refused >= 3, 60, "the runner to retry against the outage")
            assert queue_depth(rabbitmq_url, queue["queue"]) == 0  # all 8 in hand, unacked
        # stopped before any commit: closing the channel hands the unacked messages back
        await until(lambda: queue_depth(rabbitmq_url, queue["queue"]) == 8, 30, "the 8 messages back in the queue")
        assert count_effects() == 0 and runner.stats.processed == 0
    finally:
        await proxied.dispose()


@PG
@pytest.mark.rabbitmq
async def test_metrics_observer_counts_the_async_runner(aengine, effects, count_effects, rabbitmq_url, queue):
    pytest.importorskip("prometheus_client")
    from outbox.observability import ConsumerMetrics

    consumer = AsyncRecorder()
    runner = AsyncRabbitMQRunner(consumer, engine=aengine, url=rabbitmq_url, queue=queue["queue"], batch_size=5,
                                 batch_timeout=0.1)
    metrics = ConsumerMetrics(consumer.name)
    metrics.install(runner)
    sent = ritems(7)
    publish(rabbitmq_url, queue["exchange"], [*sent, sent[0]])
    async with Running(runner):
        await until(lambda: count_effects() == 7 and runner.stats.duplicates == 1, 60, "7 effects and a duplicate")
    def value(outcome: str) -> float:
        return metrics.registry.get_sample_value("outbox_consumer_messages_total",
                                                 {"consumer": consumer.name, "outcome": outcome}) or 0.0
    assert value("processed") == 7 and value("duplicate") == 1
    assert metrics.registry.get_sample_value("outbox_consumer_last_loop_timestamp_seconds",
                                             {"consumer": consumer.name}) > 0


class Ticker:
    """A task on the runner's loop that notes the longest gap between its 10 ms ticks: a call that
    blocked the loop shows as a gap as long as the call."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.max_gap, last = max(self.max_gap, now - last), now

    async def __aenter__(self) -> Ticker:
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


@PG
@pytest.mark.kafka
async def test_kafka_lag_gauge_of_the_async_runner(aengine, effects, count_effects, produce, kafka_bootstrap,
                                                   kafka_topic, kafka_config):
    """The lag gauge as the threaded runner exports it, read every ``lag_interval`` seconds: seen above 0, then
    0 on every partition once all is consumed."""
    pytest.importorskip("prometheus_client")
    from outbox.observability import ConsumerMetrics

    class Slow(AsyncRecorder):  # slow enough that the lag is seen above 0 before it reaches 0
        async def handle(self, session, message):
            await asyncio.sleep(0.03)
            return await super().handle(session, message)

    class Counting(AsyncKafkaRunner):
        reads: list[float] = []

        async def lag(self, timeout: float = 2.0):
            self.reads.append(time.monotonic())
            return await super().lag(timeout)

    produce(kafka_topic, kitems(30))
    consumer = Slow()
    runner = Counting(consumer, engine=aengine, bootstrap_servers=kafka_bootstrap, topics=[kafka_topic],
                      group_id=f"g-{uuid.uuid4().hex[:8]}", config=kafka_config, batch_size=8, batch_timeout=0.2)
    metrics = ConsumerMetrics(consumer.name, lag_interval=0.2)
    metrics.install(runner)
    seen: list[float] = []

    def caught_up() -> bool:
        lags = [metrics.registry.get_sample_value("outbox_consumer_lag_messages", {
            "consumer": consumer.name, "topic": kafka_topic, "partition": str(p)}) for p in range(3)]
        seen.extend(v for v in lags if v is not None)
        return count_effects() == 30 and lags == [0, 0, 0]

    async with Running(runner):
        await until(caught_up, 90, "30 effects and a lag of 0 on all 3 partitions")
    assert max(seen) > 0, "the lag was never seen above 0"
    gaps = [b - a for a, b in itertools.pairwise(runner.reads)]
    assert len(gaps) >= 2 and min(gaps) >= 0.2, f"not read every 0.2 s: {gaps}"
    assert metrics.broker_check() is None


@PG
@pytest.mark.rabbitmq
async def test_rabbitmq_queue_depth_gauge_of_the_async_runner_never_blocks_the_loop(
        aengine, effects, count_effects, rabbitmq_url, queue, rabbitmq_proxy):
    """The queue-depth gauge as the threaded runner exports it: the passive declare is awaited, so while
    the broker does not answer (our proxy stalls the connection) a read waits and the loop goes on; the
    gauge comes back once the broker answers."""
    pytest.importorskip("prometheus_client")
    from outbox.observability import ConsumerMetrics

    class Counting(AsyncRabbitMQRunner):
        reads: list[tuple[float, float]] = []

        async def queue_depth(self, timeout: float = 5.0):
            t0 = time.monotonic()
            try:
                return await super().queue_depth(timeout)
            finally:
                self.reads.append((t0, time.monotonic()))

    class Slow(AsyncRecorder):  # with prefetch 5, slow enough that messages are seen waiting in the queue
        async def handle(self, session, message):
            await asyncio.sleep(0.05)
            return await super().handle(session, message)

    consumer = Slow()
    runner = Counting(consumer, engine=aengine, url=rabbitmq_proxy.url(rabbitmq_url), queue=queue["queue"],
                      prefetch=5, batch_size=5, batch_timeout=0.1)
    metrics = ConsumerMetrics(consumer.name, lag_interval=0.2)
    metrics.install(runner)
    seen: list[float] = []

    def depth() -> float | None:
        n = metrics.registry.get_sample_value("outbox_consumer_queue_depth_messages",
                                              {"consumer": consumer.name, "queue": queue["queue"]})
        if n is not None:
            seen.append(n)
        return n

    publish(rabbitmq_url, queue["exchange"], ritems(12))
    async with Running(runner), Ticker() as ticker:
        await until(lambda: depth() == 0 and count_effects() == 12, 60, "12 effects and a depth of 0")
        assert max(seen) > 0, "the queue depth was never seen above 0"
        assert metrics.broker_check() is None
        rabbitmq_proxy.pause()  # the broker stops answering: the next read waits for it
        paused = time.monotonic()
        await asyncio.sleep(1.5)
        resumed = time.monotonic()
        rabbitmq_proxy.resume()
        await asyncio.to_thread(publish, rabbitmq_url, queue["exchange"], ritems(3))
        await until(lambda: count_effects() == 15 and depth() == 0, 60, "15 effects and a depth of 0 again")
    stalled = [(a, b) for a, b in runner.reads if a < resumed and b > resumed]
    assert stalled and stalled[0][0] - paused < 0.5, "no read waited on the stalled broker"
    assert ticker.max_gap < 1.0, f"the loop stood still for {ticker.max_gap:.2f} s"
    starts = [a for a, _ in runner.reads]
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.2, "read more often than every 0.2 s"


# ------------------------------------------------------------------ outbox consume with an async class

ASYNC_MODULE = textwrap.dedent('''
    import os
    import signal

    import sqlalchemy as sa
    from consumers import AsyncDedupConsumer


    class AsyncWriter(AsyncDedupConsumer):
        name = "test.async-cli"

        async def handle(self, session, message):
            await session.execute(sa.text("INSERT INTO test_consumer_effects (message_id, value) VALUES (:m, 'x')"),
                                  {"m": message.id})


    class TermInTheBatch(AsyncWriter):
        """SIGTERM to itself while handling the first message: the rest of that batch must still commit and ack."""

        sent = False

        async def handle(self, session, message):
            if not TermInTheBatch.sent:
                TermInTheBatch.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            await super().handle(session, message)
''')


def _cli(tmp_path, target: str, args: list[str]) -> subprocess.CompletedProcess:
    (tmp_path / "asynccons.py").write_text(ASYNC_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "outbox", "consume", f"asynccons:{target}", *args], env=env,
                          capture_output=True, timeout=120, cwd=tmp_path)


@PG
@pytest.mark.kafka
def test_outbox_consume_async_class_sigterm_finishes_the_batch_kafka(db_url, effects, count_effects, produce,
                                                                    committed, kafka_bootstrap, kafka_topic,
                                                                    tmp_path):
    group = f"g-{uuid.uuid4().hex[:8]}"
    sent = kitems(20)
    produce(kafka_topic, sent)
    # one partition's worth at least arrives in the first batch; SIGTERM lands inside it
    proc = _cli(tmp_path, "TermInTheBatch", ["--db", db_url, "--kafka", kafka_bootstrap, "--topic", kafka_topic,
                                            "--group", group, "--batch-size", "50", "--batch-timeout", "2",
                                            "--consumer-config", "session.timeout.ms=6000",
                                            "--consumer-config", "heartbeat.interval.ms=500"])
    err = proc.stderr.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "asyncio" in err and "finishing the batch in hand" in err
    done = count_effects()
    assert done > 1  # the batch in hand was finished after the signal ...
    assert sum(max(0, o) for o in committed(group, kafka_topic).values()) == done  # ... and its offsets committed


@pytest.mark.parametrize("dialect_name", ["postgresql", "sqlite"], indirect=True)
@pytest.mark.rabbitmq
def test_outbox_consume_async_class_sigterm_finishes_the_batch_rabbitmq(db_url, effects, count_effects, rabbitmq_url,
                                                                       queue, tmp_path):
    sent = ritems(10)
    publish(rabbitmq_url, queue["exchange"], sent)
    proc = _cli(tmp_path, "TermInTheBatch", ["--db", db_url, "--rabbitmq", rabbitmq_url, "--queue", queue["queue"],
                                            "--batch-size", "10", "--batch-timeout", "2"])
    err = proc.stderr.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "guest:guest" not in err
    assert count_effects() == 10  # the whole batch in hand committed after the signal ...
    assert queue_depth(rabbitmq_url, queue["queue"]) == 0  # ... and acked
