"""Shared fixtures of the consumer tests: a test-owned business table and message factories."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from consumers import AsyncDedupConsumer, DedupConsumer, IncomingMessage
from tests._proxy import FaultProxy

biz = sa.MetaData()
EFFECTS = sa.Table(
    "test_consumer_effects",
    biz,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(255), nullable=False),
    sa.Column("value", sa.String(255), nullable=True),
)


@pytest.fixture
def effects(engine: sa.Engine) -> Iterator[sa.Table]:
    """An empty business table where handlers record one row per effect."""
    biz.create_all(engine)
    with engine.begin() as c:
        c.execute(EFFECTS.delete())
    yield EFFECTS
    with engine.begin() as c:
        c.execute(EFFECTS.delete())


@pytest.fixture
def count_effects(engine: sa.Engine) -> Callable[..., int]:
    def count(message_id: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(EFFECTS)
        if message_id is not None:
            q = q.where(EFFECTS.c.message_id == message_id)
        with engine.connect() as c:
            return int(c.execute(q).scalar_one())

    return count


@pytest.fixture
def make_message() -> Callable[..., IncomingMessage]:
    def make(msg_id: str | None = "auto", payload: bytes = b'{"n": 1}', *, topic: str = "orders",
             key: str | None = "k", partition: int | None = None, offset: int | None = None,
             broker: str | None = None) -> IncomingMessage:
        return IncomingMessage(
            id=str(uuid.uuid4()) if msg_id == "auto" else msg_id, topic=topic, key=key, payload=payload,
            headers={"h": "v"}, content_type="application/json", partition=partition, offset=offset, broker=broker,
            ordered_by_partition=broker == "kafka",  # what the Kafka transport sets
        )

    return make


class RecorderSettings:
    """Fast retries and a record of calls; ``failing``: ids whose handler raises (sync and async recorders)."""

    name = "test.recorder"
    retry_initial = 0.001
    retry_max = 0.01
    retry_jitter = 0.001
    max_attempts = 3

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[call-arg]
        self.failing: set[str] = set()
        self.calls: list[str] = []


class Recorder(RecorderSettings, DedupConsumer):
    """Writes one effect row per handled message; fails for ids in ``failing``."""

    def handle(self, session, message):
        self.calls.append(message.id)
        session.execute(EFFECTS.insert().values(message_id=message.id, value=str(message.body)))
        if message.id in self.failing:
            raise RuntimeError(f"handler failed for {message.id}")
        return {"seen": message.id, "n": message.body.get("n")}


@pytest.fixture
def recorder_cls() -> type[Recorder]:
    return Recorder


class AsyncRecorder(RecorderSettings, AsyncDedupConsumer):
    """:class:`Recorder` for asyncio: ``async def handle`` on an ``AsyncSession``."""

    name = "test.async-recorder"

    async def handle(self, session, message):
        self.calls.append(message.id)
        await session.execute(EFFECTS.insert().values(message_id=message.id, value=str(message.body)))
        await asyncio.sleep(0)  # let other tasks run while this transaction is open
        if message.id in self.failing:
            raise RuntimeError(f"handler failed for {message.id}")
        return {"seen": message.id, "n": message.body.get("n")}


class DeadTupleCheck:
    """Counts what the watched engines' transactions did to a PostgreSQL table, race-free.

    It reads ``pg_stat_xact_user_tables`` as each transaction begins and just before it commits:
    the difference is that transaction's inserted, updated and deleted tuples (a killed
    speculative insert counts as inserted). The
    cumulative ``pg_stat_user_tables`` cannot be used: other backends of the test database (pooled
    connections of earlier tests) flush their pending counts whenever they like, between two reads.
    A tuple dies only by an insert that is rolled back or killed, an update or a delete, so no
    rollback and zero of each mean no dead tuples.
    """

    def __init__(self, db_url: str, table: str) -> None:
        if not table.isidentifier():
            raise ValueError(f"not a plain table name: {table!r}")
        self.table = table
        #: an engine the test may use; watched, like any engine passed to :meth:`watch`
        self.nullpool = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        self.counts = {"inserted": 0, "updated": 0, "deleted": 0, "rollbacks": 0}
        self.watch(self.nullpool)

    def watch(self, engine: sa.Engine) -> None:
        """Count ``engine``'s transactions (for an ``AsyncEngine``, pass its ``sync_engine``)."""
        sa.event.listen(engine, "begin", self._on_begin)
        sa.event.listen(engine, "commit", self._on_commit)
        sa.event.listen(engine, "rollback", self._on_rollback)

    def _read(self, conn: sa.Connection) -> tuple[int, int, int]:
        # the view holds the backend's counts not yet flushed to the cumulative statistics: earlier
        # transactions' too, but nothing is flushed while a transaction is open, so the difference
        # between its first and its last read is exactly what this transaction did
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute("SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables"
                           f" WHERE relname = '{self.table}'")
            row = cursor.fetchone()
        finally:
            cursor.close()
        return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))

    def _on_begin(self, conn: sa.Connection) -> None:
        conn.info["dead_tuple_check"] = self._read(conn)  # this first statement opens the transaction

    def _on_commit(self, conn: sa.Connection) -> None:
        first = conn.info.pop("dead_tuple_check")
        for name, a, b in zip(("inserted", "updated", "deleted"), first, self._read(conn), strict=True):
            self.counts[name] += b - a

    def _on_rollback(self, conn: sa.Connection) -> None:
        conn.info.pop("dead_tuple_check", None)
        self.counts["rollbacks"] += 1

    def start(self) -> dict[str, int]:
        """Begin a fresh count; return the one so far."""
        before, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return before

    def assert_no_new_tuples(self) -> None:
        assert self.counts == {"inserted": 0, "updated": 0, "deleted": 0, "rollbacks": 0}, (
            f"the duplicate deliveries changed the table: {self.counts}")


@pytest.fixture
def dead_tuple_check(engine: sa.Engine, db_url: str) -> Iterator[DeadTupleCheck]:
    """A :class:`DeadTupleCheck` of the processed-messages table, autovacuum off on it meanwhile."""
    from outbox.schema import default_tables

    table = default_tables().processed.name
    with engine.begin() as c:
        c.execute(sa.text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    check = DeadTupleCheck(db_url, table)
    try:
        yield check
    finally:
        with engine.begin() as c:
            c.execute(sa.text(f"ALTER TABLE {table} RESET (autovacuum_enabled)"))
        check.nullpool.dispose()


# ------------------------------------------------------------------ broker helpers


def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Threaded:
    """Run a runner's ``run()`` in a thread; ``stop()`` and join on exit, re-raising its error."""

    def __init__(self, runner) -> None:
        import threading

        self.runner = runner
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:  # pragma: no cover - reported by stop()
            self.error = exc

    def __enter__(self) -> Threaded:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.runner.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "runner did not stop"
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def helpers():
    class H:
        wait = staticmethod(wait_for)
        threaded = Threaded

    return H


def kafka_produce(bootstrap: str, topic: str, items: list[tuple[str | None, str, bytes]]) -> None:
    """Produce (message id or None, key, payload) with the relay's ``message-id`` header."""
    from confluent_kafka import Producer

    from outbox.brokers.base import MESSAGE_ID_HEADER

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for msg_id, key, payload in items:
        headers = [("content-type", b"application/json")]
        if msg_id is not None:
            headers.append((MESSAGE_ID_HEADER, msg_id.encode()))
        p.produce(topic, value=payload, key=key.encode(), headers=headers)
    assert p.flush(30) == 0


@pytest.fixture
def produce(kafka_bootstrap: str):
    def go(topic: str, items: list[tuple[str | None, str, bytes]]) -> None:
        kafka_produce(kafka_bootstrap, topic, items)

    return go


@pytest.fixture
def committed(kafka_bootstrap: str):
    """``committed(group, topic)`` -> {partition: committed offset} (-1001 when none)."""

    def read(group: str, topic: str, partitions: int = 3) -> dict[int, int]:
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
        try:
            got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=20)
            return {tp.partition: tp.offset for tp in got}
        finally:
            c.close()

    return read


KAFKA_TEST_CONFIG = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                     "topic.metadata.refresh.interval.ms": 1000}


@pytest.fixture
def kafka_config() -> dict[str, object]:
    return dict(KAFKA_TEST_CONFIG)


# ------------------------------------------------------------------ a link that can be cut


@pytest.fixture
def rabbitmq_proxy(rabbitmq_url: str, fault_proxy: Callable[..., FaultProxy]) -> FaultProxy:
    """The suite's fault proxy (tests/_proxy.py) in front of the shared RabbitMQ: faults go on our own
    proxy, never on the shared service. ``rabbitmq_proxy.url(rabbitmq_url)`` is the URL through it."""
    from urllib.parse import urlsplit

    parts = urlsplit(rabbitmq_url)
    return fault_proxy(parts.hostname or "127.0.0.1", parts.port or 5672)


# ------------------------------------------------------------------ RabbitMQ helpers (publish, depth: tests/_amqp.py)


@pytest.fixture
def queue(rabbitmq_url: str, amqp_names: dict[str, str]) -> dict[str, str]:
    """A durable queue bound to its exchange, with a dead-letter exchange and queue (names in ``amqp_names``)."""
    from consumers import declare_queue

    declare_queue(rabbitmq_url, amqp_names["queue"], exchange=amqp_names["exchange"],
                  dead_letter_exchange=amqp_names["dlx"], dead_letter_queue=amqp_names["dlq"])
    return amqp_names
