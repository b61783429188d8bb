"""A relay frozen (SIGSTOP) inside its claim-publish-mark round must not break per-key order.

Relay A claims a batch and stops itself at a chosen point (see ``_frozen_child.py``); relay B
starts next to it. A stays frozen well past its lease TTL plus the takeover guard (lease TTL +
publish timeout), or until B has published every row but A's batch, whichever comes first. Then A
is woken, everything is drained, and a fresh consumer reads the topic back: per key, the first
deliveries must be in outbox-id order (duplicates are allowed: at least once).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from .conftest import REPO, TABLES, Got, KafkaReader, RabbitReader, _env, declare_queue, wait_until, write

CHILD = Path(__file__).with_name("_frozen_child.py")
TTL = 3.0
PUBLISH_TIMEOUT = 2.0
GUARD = TTL + PUBLISH_TIMEOUT
KEYS = 20
N = 2000


class Child:
    def __init__(self, spec: dict[str, Any], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(CHILD), json.dumps(spec)], stdout=subprocess.PIPE,
                                     stderr=self._log, stdin=subprocess.DEVNULL, env=_env(), cwd=str(REPO), text=True)

    def event(self, name: str, timeout: float) -> dict[str, Any]:
        """The next stdout event called ``name`` (a deadline via a reader thread-free poll)."""
        import selectors

        sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no {name!r} event within {timeout} s; log:\n{self.log()[-3000:]}")
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"child exited before {name!r}; log:\n{self.log()[-3000:]}")
            ev = json.loads(line)
            if ev["event"] == name:
                return ev

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def keys_out_of_order(got: list[Got]) -> dict[str, list[int]]:
    """Keys whose first deliveries are not in seq (= outbox id) order, with their first-delivery order."""
    firsts: dict[str, list[int]] = {}
    seen: set[int] = set()
    for m in got:
        if m.seq in seen:
            continue
        seen.add(m.seq)
        firsts.setdefault(str(m.key), []).append(m.seq)
    return {k: v for k, v in firsts.items() if any(b < a for a, b in itertools.pairwise(v))}


def _remaining(engine: sa.Engine, exclude: set[int]) -> int:
    o = TABLES.outbox
    with engine.connect() as c:
        ids = set(c.execute(sa.select(o.c.id)).scalars())
    return len(ids - exclude)


def _lease_expired_for(engine: sa.Engine, owner: str) -> float:
    """Seconds since the last of ``owner``'s leases expired (negative: not yet), inf if it has none."""
    le = TABLES.leases
    with engine.connect() as c:
        latest = c.execute(sa.select(sa.func.max(le.c.expires_at)).where(le.c.owner == owner)).scalar()
    if latest is None:
        return float("inf")
    if latest.tzinfo is None:
        latest = latest.replace(tzinfo=dt.timezone.utc)
    return (dt.datetime.now(dt.timezone.utc) - latest).total_seconds()


@pytest.fixture
def broker(request, readers):
    """(topic, relay spec entries, make a fresh reader) for Kafka or RabbitMQ."""
    if request.param == "kafka":
        bootstrap, topic = request.getfixturevalue("kafka_bootstrap"), request.getfixturevalue("kafka_topic")

        def kafka() -> KafkaReader:
            r = KafkaReader(bootstrap, topic)
            readers.append(r)
            return r

        return topic, {"bootstrap": bootstrap}, kafka
    url, names = request.getfixturevalue("rabbitmq_url"), request.getfixturevalue("amqp_names")
    declare_queue(url, names["exchange"], names["queue"])

    def rabbit() -> RabbitReader:
        r = RabbitReader(url, names["queue"])
        readers.append(r)
        return r

    return names["exchange"], {"rabbitmq": url}, rabbit


CASES = [pytest.param(db, "kafka", point, id=f"{db}-kafka-{point}")
         for db in ("postgresql", "mariadb") for point in ("after_claim", "mid_publish", "before_mark", "before_claim")]
CASES += [pytest.param("postgresql", "rabbitmq", point, id=f"postgresql-rabbitmq-{point}")
          for point in ("after_claim", "mid_publish")]


@pytest.mark.slow
@pytest.mark.parametrize(("dialect", "broker", "point"), CASES, indirect=["broker"])
def test_a_relay_frozen_inside_its_round_never_breaks_per_key_order(dialect, broker, point, db, tmp_path):
    d = db(dialect)
    topic, target, fresh_reader = broker
    write(d.engine, topic, range(N), keys=KEYS)
    spec = {"url": d.url, **target, "lease_ttl": TTL, "publish_timeout": PUBLISH_TIMEOUT, "batch_size": 100}
    a = Child({**spec, "relay_id": "A", "freeze": point}, tmp_path / "a.log")
    b = None
    try:
        frozen = a.event("frozen", timeout=90)
        batch = set(frozen["ids"])
        frozen_at = time.monotonic()
        b = Child({**spec, "relay_id": "B", "freeze": "none"}, tmp_path / "b.log")
        b.event("started", timeout=60)
        # Before the fix B takes A's partitions once A's leases lapse and, after the takeover guard,
        # publishes every row but A's locked batch. Wait for that, or long enough for it to happen.
        wait_until(lambda: _remaining(d.engine, batch) == 0 or time.monotonic() - frozen_at > 4 * GUARD + 10,
                   timeout=120, what="B to publish past A's batch, or the guard window to pass long ago")
        assert _lease_expired_for(d.engine, "A") > GUARD or _remaining(d.engine, batch) == 0
        a.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: d.rows() == 0, timeout=120, what="every row to be published and deleted")
    finally:
        for c in (a, b):
            if c is not None:
                c.stop()
    got = fresh_reader().wait_seqs(set(range(N)), timeout=90)
    bad = keys_out_of_order(got)
    assert not bad, (f"{len(bad)} of {KEYS} keys out of order after a freeze at {point} "
                     f"(A's batch: {len(batch)} rows); first: {next(iter(bad.items()))}")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_claim", "mid_publish"])
def test_a_frozen_relay_whose_session_the_database_ended_only_sends_duplicates(
        point, db, kafka_bootstrap, kafka_topic, readers, tmp_path):
    """With ``idle_in_transaction_session_timeout`` PostgreSQL ends a frozen relay's transaction, which
    releases its locks: the partitions move on without it, and what it sends when it wakes are
    repeats of rows the new owner already sent from the same first row, so first deliveries stay
    in order."""
    d = db("postgresql")
    write(d.engine, kafka_topic, range(N), keys=KEYS)
    spec = {"url": d.url, "bootstrap": kafka_bootstrap, "lease_ttl": TTL, "publish_timeout": PUBLISH_TIMEOUT,
            "batch_size": 100}
    a = Child({**spec, "relay_id": "A", "freeze": point,
               "pg_options": "-c idle_in_transaction_session_timeout=4000"}, tmp_path / "a.log")
    b = None
    try:
        batch = set(a.event("frozen", timeout=90)["ids"])
        b = Child({**spec, "relay_id": "B", "freeze": "none"}, tmp_path / "b.log")
        b.event("started", timeout=60)
        wait_until(lambda: d.rows() == 0, timeout=120, what="B to publish everything, A's batch included")
        a.proc.send_signal(signal.SIGCONT)
        a.event("woke", timeout=30)
        write(d.engine, kafka_topic, range(N, N + 200), keys=KEYS)  # A (restarted) and B share these
        wait_until(lambda: d.rows() == 0, timeout=120, what="the rows written after A woke")
    finally:
        for c in (a, b):
            if c is not None:
                c.stop()
    assert batch
    reader = KafkaReader(kafka_bootstrap, kafka_topic)
    readers.append(reader)
    got = reader.wait_seqs(set(range(N + 200)), timeout=90)
    bad = keys_out_of_order(got)
    assert not bad, f"{len(bad)} keys out of order; first: {next(iter(bad.items()))}"
