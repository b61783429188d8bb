"""The consumer-runner contract suite: what a dedup consumer relies on from every transport's runner.

Messages go the whole way: ``Outbox.add`` in a committed transaction, ``Relay`` with the transport's
own publisher, the transport's runner feeding a :class:`~consumers.DedupConsumer`. Crashes are real
as far as the broker can tell: an exception that no ``except Exception`` stops (like a process
kill) leaves the runner's loop at the chosen point, and the runner's connection is dropped without
an ack or offset commit; a new runner in the same group (queue) then gets the messages again.

Subclass :class:`ConsumerRunnerContract`, set ``features`` and provide a ``harness`` fixture
returning a :class:`ConsumerHarness`. The database is a fresh SQLite file per test unless the
subclass overrides the ``contract_engine`` fixture (with a migrated, empty database).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from consumers import DedupConsumer, IncomingMessage

from .. import migrations
from ..config import RelayConfig
from ..relay import Relay
from ..transports.base import Outcome, Publisher
from ..writer import Outbox
from ._features import Features
from ._records import record

__all__ = ["ConsumerHarness", "ConsumerRunnerContract", "Runner", "SimulatedCrash", "wait_for"]

_FAST_RELAY = {"min_poll_interval": 0.01, "poll_interval": 0.05, "progress_interval": 0, "lease_ttl": 3.0}


class SimulatedCrash(BaseException):
    """Raised inside the runner to stop it dead, the way SIGKILL would: not an ``Exception``, so no
    retry loop or error handler catches it."""


class Runner(Protocol):
    """What a transport's runner offers: ``run()`` until ``stop()``, and ``stats`` (``duplicates``...)."""

    stats: Any

    def run(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class ConsumerHarness:
    """What a transport gives the consumer-runner suite."""

    topic: str
    """What ``Outbox.add`` writes to (Kafka topic, AMQP exchange...): it reaches the runners' source."""
    publisher: Callable[[], Publisher]
    """A new publisher for the relay (the relay closes it)."""
    runner: Callable[[DedupConsumer, sa.Engine], Runner]
    """A new runner for ``consumer``; every runner of one harness reads the same source as one group
    (the same Kafka group, the same queue), so a new runner gets what an old one did not settle."""
    backlog: Callable[[int], int]
    """``backlog(published)``: how many messages of the source are not settled (acked, offset
    committed), given that ``published`` messages in all were sent to it during the test (a reader
    may need the count, e.g. where the broker's end offsets cannot be trusted). Called only while no
    runner runs."""


def wait_for(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class _Running:
    """A runner's ``run()`` in a thread."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="contract-runner")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.runner.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the runner did not stop within 60 s of stop()"
        if self.error is not None:
            raise self.error

    def crashed(self, timeout: float = 60.0) -> SimulatedCrash:
        """Wait for run() to end by the simulated crash; return it."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.runner.stop()
            self.thread.join(30)
            raise AssertionError(f"the runner did not crash within {timeout}s")
        assert isinstance(self.error, SimulatedCrash), f"run() ended with {self.error!r}, not the simulated crash"
        return self.error


_meta = sa.MetaData()
EFFECTS = sa.Table(
    "outboxkit_contract_effects",
    _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(255), nullable=False),
    sa.Column("body", sa.Text, nullable=True),
)


@dataclass
class Seen:
    id: str
    topic: str
    key: str | None
    body: Any
    headers: dict[str, str]
    content_type: str | None
    redelivered: bool


class Recorder(DedupConsumer):
    """Writes one effect row per handled message (in the batch's transaction) and notes what it saw.

    ``crash_in_handle``: the first ``handle`` raises :class:`SimulatedCrash` (nothing commits).
    ``crash_after_commit``: the first batch's database commit succeeds, then the crash (no ack).
    """

    name = "outboxkit.contract"
    retry_initial = 0.001
    retry_max = 0.01
    retry_jitter = 0.001

    def __init__(self, *, crash_in_handle: bool = False, crash_after_commit: bool = False) -> None:
        super().__init__(session_factory=self._session)
        self.crash_in_handle = crash_in_handle
        self.crash_after_commit = crash_after_commit
        self.seen: list[Seen] = []
        self.committed: list[str] = []
        self._lock = threading.Lock()

    def _session(self, engine: sa.Engine) -> Session:
        session = Session(bind=engine, expire_on_commit=False, autoflush=True)
        pending: list[str] = []
        session.info["contract_pending"] = pending

        @sa.event.listens_for(session, "after_commit")
        def _committed(_s: Session) -> None:
            with self._lock:
                self.committed.extend(pending)
                pending.clear()
                crash, self.crash_after_commit = self.crash_after_commit, False
            if crash:
                raise SimulatedCrash("after the database commit, before the ack")

        @sa.event.listens_for(session, "after_rollback")
        def _rolled_back(_s: Session) -> None:
            pending.clear()

        return session

    def handle(self, session: Session, message: IncomingMessage) -> Any:
        with self._lock:
            crash, self.crash_in_handle = self.crash_in_handle, False
            self.seen.append(Seen(str(message.id), message.topic, message.key, message.body, dict(message.headers),
                                  message.content_type, bool(message.redelivered)))
        if crash:
            raise SimulatedCrash("in handle(), before the database commit")
        session.execute(EFFECTS.insert().values(message_id=message.id, body=json.dumps(message.body)))
        session.info["contract_pending"].append(str(message.id))
        return None

    def handled(self) -> int:
        with self._lock:
            return len(self.seen)


class ConsumerRunnerContract:
    """The consumer-runner contract: subclass it (name the subclass ``Test...``), set
    :attr:`features`, override the ``harness`` fixture (and ``contract_engine`` for another database)."""

    features: ClassVar[Features] = Features()

    @pytest.fixture
    def harness(self) -> ConsumerHarness:
        raise NotImplementedError(f"{type(self).__name__} must define a `harness` fixture returning a "
                                  "ConsumerHarness (see outbox.testing)")

    @pytest.fixture
    def contract_engine(self, tmp_path: Path) -> Iterator[sa.Engine]:
        """A migrated database of its own: a SQLite file."""
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'contract.db'}", connect_args={"timeout": 30})
        migrations.upgrade(engine)
        yield engine
        engine.dispose()

    @pytest.fixture
    def effects(self, contract_engine: sa.Engine) -> Iterator[sa.Table]:
        _meta.create_all(contract_engine)
        with contract_engine.begin() as c:
            c.execute(EFFECTS.delete())
        yield EFFECTS
        with contract_engine.begin() as c:
            c.execute(EFFECTS.delete())

    @pytest.fixture(autouse=True)
    def _applies(self) -> None:
        if not self.features.consumer_runner:
            pytest.skip("the transport does not claim Features.consumer_runner")

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def write(engine: sa.Engine, harness: ConsumerHarness, messages: Sequence[dict[str, Any]]) -> list[uuid.UUID]:
        """``Outbox.add`` each message (keyword arguments of ``add`` plus ``payload``) in one
        committed transaction, then relay them all with the harness's publisher."""
        with Session(engine) as s, s.begin():
            ids = [Outbox().add(s, harness.topic, m.get("payload", {}), **{k: v for k, v in m.items()
                                                                           if k != "payload"})
                   for m in messages]
        relay = Relay(engine, harness.publisher(), config=RelayConfig(**_FAST_RELAY))
        try:
            sent = relay.drain(timeout=60)
        finally:
            relay.close()
        assert sent == len(messages), f"the relay published {sent} of {len(messages)}"
        return ids

    @staticmethod
    def effects_of(engine: sa.Engine) -> dict[str, int]:
        with engine.connect() as c:
            rows = c.execute(sa.select(EFFECTS.c.message_id, sa.func.count()).group_by(EFFECTS.c.message_id))
            return {str(mid): int(n) for mid, n in rows}

    @staticmethod
    def consume(harness: ConsumerHarness, engine: sa.Engine, consumer: Recorder, until: Callable[[], object],
                what: str, timeout: float = 90.0) -> Runner:
        """Run a new runner until ``until()`` holds, then stop it (the batch in hand settles first)."""
        running = _Running(harness.runner(consumer, engine))
        try:
            wait_for(lambda: until() or running.error is not None, timeout, what)
        finally:
            running.stop()
        return running.runner

    def settled_backlog(self, harness: ConsumerHarness, published: int, expected: int, what: str) -> None:
        """Wait until the broker reports ``expected`` unsettled messages (a dropped connection's
        unacked messages go back to the queue asynchronously)."""
        last: list[int] = []

        def check() -> bool:
            last[:] = [harness.backlog(published)]
            return last[0] == expected

        try:
            wait_for(check, 30.0, what)
        except AssertionError:
            raise AssertionError(f"{what}: backlog {last[0] if last else '?'}, expected {expected}") from None

    # ------------------------------------------------------------------ the tests

    def test_ids_are_taken_from_the_message(self, harness: ConsumerHarness, contract_engine: sa.Engine,
                                            effects: sa.Table) -> None:
        ids = self.write(contract_engine, harness, [{"payload": {"n": i}, "key": f"k{i % 3}"} for i in range(6)])
        consumer = Recorder()
        self.consume(harness, contract_engine, consumer, lambda: consumer.handled() >= 6, "6 messages handled")
        assert sorted(s.id for s in consumer.seen) == sorted(str(i) for i in ids)
        assert self.effects_of(contract_engine) == {str(i): 1 for i in ids}
        self.settled_backlog(harness, len(ids), 0, "every handled message acknowledged")

    def test_headers_key_body_and_content_type_round_trip(self, harness: ConsumerHarness,
                                                          contract_engine: sa.Engine, effects: sa.Table) -> None:
        (mid,) = self.write(contract_engine, harness, [{
            "payload": {"total": 12.5, "name": "ünïcode"}, "key": "order-17",
            "headers": {"tenant": "ünïcode", "trace-id": "abc-123"},
        }])
        consumer = Recorder()
        self.consume(harness, contract_engine, consumer, lambda: consumer.handled() >= 1, "the message handled")
        (seen,) = consumer.seen
        assert seen.id == str(mid)
        assert seen.topic == harness.topic
        assert seen.key == "order-17"
        assert seen.body == {"total": 12.5, "name": "ünïcode"}
        assert seen.headers.get("tenant") == "ünïcode"
        assert seen.headers.get("trace-id") == "abc-123"
        assert seen.content_type == "application/json"

    def test_a_message_published_twice_has_one_effect(self, harness: ConsumerHarness, contract_engine: sa.Engine,
                                                      effects: sa.Table) -> None:
        (mid,) = self.write(contract_engine, harness, [{"payload": {"n": 1}, "key": "k"}])
        # the relay's at-least-once: the same row published again (a crash before the row was deleted)
        again = record(harness.topic, b'{"n": 1}', key="k", content_type="application/json", message_id=mid)
        pub = harness.publisher()
        try:
            assert pub.publish([again], timeout=30)[0].outcome is Outcome.DELIVERED
        finally:
            pub.close(timeout=10)
        consumer = Recorder()
        running = _Running(harness.runner(consumer, contract_engine))
        try:
            wait_for(lambda: consumer.handled() >= 1 and running.runner.stats.duplicates >= 1, 90,
                     "one message handled and one duplicate skipped")
        finally:
            running.stop()
        assert [s.id for s in consumer.seen] == [str(mid)]
        assert self.effects_of(contract_engine) == {str(mid): 1}
        self.settled_backlog(harness, 2, 0, "the duplicate acknowledged too")

    def test_a_crash_before_the_database_commit_leaves_no_effect_and_nothing_acked(
            self, harness: ConsumerHarness, contract_engine: sa.Engine, effects: sa.Table) -> None:
        ids = self.write(contract_engine, harness, [{"payload": {"n": i}, "key": f"k{i % 2}"} for i in range(4)])
        first = Recorder(crash_in_handle=True)
        _Running(harness.runner(first, contract_engine)).crashed()
        crashed_on = first.seen[0].id
        assert self.effects_of(contract_engine) == {}
        self.settled_backlog(harness, len(ids), len(ids), "all unacknowledged after a crash before the commit")

        second = Recorder()
        self.consume(harness, contract_engine, second, lambda: second.handled() >= len(ids), "all redelivered")
        assert self.effects_of(contract_engine) == {str(i): 1 for i in ids}
        if self.features.redelivery_flag:
            assert [s.redelivered for s in second.seen if s.id == crashed_on] == [True]
        self.settled_backlog(harness, len(ids), 0, "every message acknowledged after the restart")

    def test_a_crash_after_the_commit_before_the_ack_redelivers_as_a_no_op(
            self, harness: ConsumerHarness, contract_engine: sa.Engine, effects: sa.Table) -> None:
        ids = self.write(contract_engine, harness, [{"payload": {"n": i}, "key": f"k{i % 2}"} for i in range(4)])
        first = Recorder(crash_after_commit=True)
        _Running(harness.runner(first, contract_engine)).crashed()
        done = set(first.committed)
        assert done, "the first batch committed nothing before the crash"
        assert self.effects_of(contract_engine) == dict.fromkeys(done, 1)
        # the ack (offset commit) comes only after the database commit: the crash between them left all unsettled
        self.settled_backlog(harness, len(ids), len(ids), "nothing acked by a runner that crashed before its ack")

        second = Recorder()
        running = _Running(harness.runner(second, contract_engine))
        try:
            wait_for(lambda: second.handled() >= len(ids) - len(done)
                     and running.runner.stats.duplicates >= len(done), 90,
                     "the rest handled and the committed ones skipped as duplicates")
        finally:
            running.stop()
        assert not done & {s.id for s in second.seen}, "a message whose effects committed was handled again"
        assert self.effects_of(contract_engine) == {str(i): 1 for i in ids}
        self.settled_backlog(harness, len(ids), 0, "every message acknowledged after the restart")

    def test_per_key_order_reaches_the_handler(self, harness: ConsumerHarness, contract_engine: sa.Engine,
                                               effects: sa.Table) -> None:
        if not self.features.per_key_order:
            pytest.skip("the transport does not claim Features.per_key_order")
        self.write(contract_engine, harness, [{"payload": {"n": i // 3}, "key": f"k{i % 3}"} for i in range(30)])
        consumer = Recorder()
        self.consume(harness, contract_engine, consumer, lambda: consumer.handled() >= 30, "30 messages handled")
        by_key: dict[str | None, list[int]] = defaultdict(list)
        for s in consumer.seen:
            by_key[s.key].append(int(s.body["n"]))
        assert by_key == {f"k{k}": list(range(10)) for k in range(3)}
