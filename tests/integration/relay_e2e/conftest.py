"""Helpers for the relay's end-to-end tests on the real services.

- ``db(dialect)``: a migrated engine and its URL, every toolkit table emptied before and after;
- ``write`` / ``write_rolled_back``: outbox messages ``{"seq": i, "key": k}`` in one transaction;
- ``KafkaReader`` (``assign()`` on every partition from the beginning: no group join with tansu)
  and ``RabbitReader`` (a queue bound with ``#``): what reached the broker, as :class:`Got`;
- ``start_relay``: ``outbox relay`` subprocesses (stderr in a file), killed at teardown if left;
- ``run_cli``: any other ``outbox`` sub-command, returning the completed process;
- link faults: the suite's ``fault_proxy`` fixture (tests/conftest.py, tests/_proxy.py);
- ``wait_until``: poll a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, default_tables

TABLES = default_tables()
ROLLED_BACK = "ROLLED-BACK-MARKER"
REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------ waiting


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Return ``cond()``'s first truthy value; fail naming ``what`` when ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ databases


@dataclass
class Db:
    dialect: str
    engine: sa.Engine
    url: str

    def pending(self) -> int:
        o = TABLES.outbox
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(o).where(o.c.status == "pending")).scalar_one())

    def rows(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(TABLES.outbox)).scalar_one())

    def dead_rows(self) -> list[Any]:
        o = TABLES.outbox
        with self.engine.connect() as c:
            return list(c.execute(sa.select(o.c.id, o.c.key, o.c.last_error).where(o.c.status == "dead")).all())

    def lease_owners(self) -> dict[int, str | None]:
        le = TABLES.leases
        with self.engine.connect() as c:
            return dict(c.execute(sa.select(le.c.partition, le.c.owner)).all())

    def relay_ids(self) -> list[str]:
        r = TABLES.relays
        with self.engine.connect() as c:
            return list(c.execute(sa.select(r.c.relay_id)).scalars())


def _empty(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for t in TABLES.all():
            conn.execute(t.delete())


@pytest.fixture
def db(database_urls: dict[str, str], _migrated_engines: dict[str, sa.Engine]) -> Iterator[Callable[[str], Db]]:
    """``db("postgresql")`` -> :class:`Db` with every toolkit table emptied (and emptied again after)."""
    used: list[sa.Engine] = []

    def get(dialect: str) -> Db:
        engine = _migrated_engines[dialect]
        _empty(engine)
        used.append(engine)
        return Db(dialect, engine, database_urls[dialect])

    yield get
    for engine in used:
        with contextlib.suppress(Exception):
            _empty(engine)


def key_of(i: int, keys: int) -> str:
    return f"k{i % keys}"


def write(engine: sa.Engine, topic: str, seqs: range | list[int], *, keys: int = 10, key: str | None = None,
          extra: dict[str, Any] | None = None, box: Outbox | None = None) -> list[uuid.UUID]:
    """Commit one transaction of messages ``{"seq": i, "key": k, **extra}`` (key ``k{i % keys}`` unless given)."""
    box = box or Outbox()
    msgs = []
    for i in seqs:
        k = key if key is not None else key_of(i, keys)
        msgs.append(OutgoingMessage(topic, {"seq": i, "key": k, **(extra or {})}, key=k,
                                    headers={"x-test": "relay-e2e"}))
    with Session(engine) as s, s.begin():
        return box.add_many(s, msgs)


def write_rolled_back(engine: sa.Engine, topic: str, seqs: range | list[int], *, key: str = "rb") -> None:
    """Messages marked ``ROLLED_BACK`` in a transaction that is flushed (where possible) and rolled back."""
    with Session(engine) as s:
        s.begin()
        Outbox().add_many(s, [OutgoingMessage(topic, {"seq": i, "key": key, "marker": ROLLED_BACK}, key=key)
                              for i in seqs])
        if engine.dialect.name != "sqlite":  # SQLite: an open write transaction would block the relay
            s.flush()
        s.rollback()


# ------------------------------------------------------------------ broker readers


@dataclass
class Got:
    topic: str
    key: str | None
    payload: dict[str, Any]
    headers: dict[str, str]
    message_id: str | None = None
    """AMQP ``message_id`` property (RabbitMQ only)."""

    @property
    def seq(self) -> int:
        return int(self.payload["seq"])


@dataclass
class _Reader:
    got: list[Got] = field(default_factory=list)

    def poll(self, timeout: float) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def seqs(self, *, marker: str | None = None) -> set[int]:
        return {m.seq for m in self.got if marker is None or m.payload.get("marker") == marker}

    def wait_for(self, cond: Callable[[list[Got]], bool], timeout: float, what: str) -> list[Got]:
        deadline = time.monotonic() + timeout
        while not cond(self.got):
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                     f"({len(self.got)} messages read)")
            self.poll(0.2)
        return self.got

    def wait_seqs(self, expected: set[int], timeout: float) -> list[Got]:
        def done(got: list[Got]) -> bool:
            return expected <= {m.seq for m in got}

        try:
            return self.wait_for(done, timeout, f"{len(expected)} seqs")
        except AssertionError as exc:
            missing = sorted(expected - self.seqs())
            raise AssertionError(f"{exc}; {len(missing)} missing, first {missing[:10]}") from None

    def wait_count(self, n: int, timeout: float) -> list[Got]:
        return self.wait_for(lambda got: len(got) >= n, timeout, f"{n} messages")


class KafkaReader(_Reader):
    """Reads every partition of ``topic`` from the beginning with ``assign()`` (no consumer group join)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__()
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"e2e-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "auto.offset.reset": "earliest", "log_level": 0,
        })
        md = self.consumer.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        assert parts, f"topic {topic} has no partitions"
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])

    def poll(self, timeout: float) -> None:
        for msg in self.consumer.consume(num_messages=1000, timeout=timeout):
            if msg.error():
                continue
            key = msg.key()
            headers = {k: (v or b"").decode() for k, v in (msg.headers() or [])}
            self.got.append(Got(msg.topic(), None if key is None else key.decode(), json.loads(msg.value()), headers))

    def close(self) -> None:
        self.consumer.close()


class RabbitReader(_Reader):
    """Consumes ``queue`` (auto-ack). Declare and bind it first with :func:`declare_queue`."""

    def __init__(self, url: str, queue: str) -> None:
        super().__init__()
        import pika

        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.chan = self.conn.channel()
        self.stream = self.chan.consume(queue, auto_ack=True, inactivity_timeout=0.2)

    def poll(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            method, props, body = next(self.stream)
            if method is None:
                return
            headers = {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in (props.headers or {}).items()}
            self.got.append(Got(method.exchange, method.routing_key, json.loads(body), headers, props.message_id))
            if time.monotonic() >= deadline:
                return

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.cancel()
            self.conn.close()


def declare_queue(url: str, exchange: str, queue: str, binding: str | None = "#") -> None:
    """A durable topic exchange and a durable queue, bound with ``binding`` (none when ``None``)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange, "topic", durable=True)
        ch.queue_declare(queue, durable=True)
        if binding is not None:
            ch.queue_bind(queue, exchange, binding)
    finally:
        conn.close()


@pytest.fixture
def readers() -> Iterator[list[_Reader]]:
    """Append readers here to have them closed after the test."""
    made: list[_Reader] = []
    yield made
    for r in made:
        with contextlib.suppress(Exception):
            r.close()  # type: ignore[attr-defined]


@pytest.fixture
def kafka_reader(readers: list[_Reader]) -> Callable[[str, str], KafkaReader]:
    def make(bootstrap: str, topic: str) -> KafkaReader:
        r = KafkaReader(bootstrap, topic)
        readers.append(r)
        return r

    return make


@pytest.fixture
def rabbit_reader(readers: list[_Reader]) -> Callable[[str, str], RabbitReader]:
    def make(url: str, queue: str) -> RabbitReader:
        r = RabbitReader(url, queue)
        readers.append(r)
        return r

    return make


def first_occurrences_in_order(got: list[Got]) -> dict[str, list[int]]:
    """Per key, the seqs in order of their first occurrence; fails naming a key whose order is broken."""
    seen: dict[str, set[int]] = {}
    firsts: dict[str, list[int]] = {}
    for m in got:
        assert m.key is not None
        s = seen.setdefault(m.key, set())
        if m.seq in s:
            continue
        s.add(m.seq)
        firsts.setdefault(m.key, []).append(m.seq)
    for key, seqs in firsts.items():
        bad = [(a, b) for a, b in itertools.pairwise(seqs) if b <= a]
        assert not bad, (f"key {key}: first occurrences out of order at {bad[:5]}; "
                         f"arrival order: {[m.seq for m in got if m.key == key]}")
    return firsts


# ------------------------------------------------------------------ subprocesses


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``outbox ARGS...`` to completion; stdout and stderr as text."""
    return subprocess.run([sys.executable, "-m", "outbox", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=str(REPO))


def cli_json(*args: str) -> Any:
    done = run_cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class RelayProc:
    """One ``outbox relay`` subprocess; its stderr goes to a file read with :meth:`log`."""

    def __init__(self, args: list[str], log_path: Path, log_level: str = "INFO") -> None:
        self.args = args
        self.log_path = log_path
        self._fh = open(log_path, "wb")
        cmd = [sys.executable, "-m", "outbox", "--log-level", log_level, "relay", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(), cwd=str(REPO))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.alive:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"relay did not exit within {timeout} s after {signal.Signals(sig).name}; "
                                 f"log tail:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self._fh.close()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProc]]:
    """``start_relay("--db", url, "--kafka", servers, ..., name=, log_level=)``; leftovers SIGKILLed at teardown."""
    procs: list[RelayProc] = []

    def start(*args: str, name: str | None = None, log_level: str = "INFO") -> RelayProc:
        p = RelayProc(list(args), tmp_path / f"{name or f'relay{len(procs)}'}.log", log_level)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def relay_args(db_url: str, *broker: str, relay_id: str | None = None, lease_ttl: float = 3, batch: int = 500,
               poll: float = 0.2, extra: tuple[str, ...] = ()) -> list[str]:
    args = ["--db", db_url, *broker, "--lease-ttl", str(lease_ttl), "--batch-size", str(batch),
            "--poll-interval", str(poll)]
    if relay_id:
        args += ["--relay-id", relay_id]
    return [*args, *extra]


# ------------------------------------------------------------------ Kafka topics


def create_topic(bootstrap: str, name: str, partitions: int = 3) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        fut.result(30)


def topic_exists(bootstrap: str, name: str) -> bool:
    from confluent_kafka.admin import AdminClient

    return name in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics



# ------------------------------------------------------------------ in-process relays


@pytest.fixture
def thread_relay() -> Iterator[Callable[..., Any]]:
    """``thread_relay(engine, publisher, **RelayConfig settings)`` runs ``Relay.run`` in a thread until teardown."""
    from outbox.config import RelayConfig
    from outbox.relay import Relay

    running: list[tuple[Relay, threading.Thread]] = []

    def start(engine: sa.Engine, publisher: Any, **settings: Any) -> Relay:
        settings = {"poll_interval": 0.1, "lease_ttl": 3.0, "progress_interval": 0, **settings}
        relay = Relay(engine, publisher, config=RelayConfig(**settings))
        t = threading.Thread(target=relay.run, name="relay", daemon=True)
        t.start()
        running.append((relay, t))
        return relay

    yield start
    for relay, t in running:
        relay.stop()
        t.join(60)
        assert not t.is_alive(), "the relay thread did not stop"
