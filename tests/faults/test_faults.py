"""The fault matrix: database x broker x fault, each case measured end to end.

Every case writes ``N`` messages over ``KEYS`` keys (``{"seq": i, "key": "k<i % KEYS>"}``, so seq
order is id order), injects one fault into real relay processes, waits for the drain (no pending
row left), stops the relays, reads everything back with a fresh reader and checks:

- missing == 0, always (dead rows count only where the case hand-corrupted them);
- out-of-order keys == 0 (a key's FIRST deliveries in id order) wherever the guarantee covers it;
- duplicates <= one batch per injected fault (what a relay can have sent and not marked).

The numbers go into docs/guarantees.md (``pytest tests/faults --write-guarantees``).
Cases that fail on today's main because of an issue-9 bug carry ``xfail(strict=False)`` naming the
item and the branch that fixes it: remove the marker once that branch is merged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests._proxy import FaultProxy

from ._harness import (
    TABLES,
    Case,
    KafkaTarget,
    OwnTansu,
    RabbitTarget,
    Result,
    port_of,
    via,
    wait_until,
)

N = 2000
KEYS = 50
BATCH = 100
TTL = 3.0

G_FULL = "lost: never; duplicates: ≤ 1 batch per fault; order: per key"
G_NO_FENCE = ("lost: never; duplicates: ≤ 1 batch per fault; order: not guaranteed "
              "(RabbitMQ has no broker-side fencing of a frozen relay)")


def fault_duration(seconds: float) -> None:
    """The fault lasting ``seconds`` (a link down, a process frozen): not a wait for an event."""
    time.sleep(seconds)


@dataclass
class Env:
    dialect: str
    broker: str
    engine: sa.Engine
    db_url: str
    tmp_path: Path
    request: pytest.FixtureRequest
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def proxy(self, port: int) -> FaultProxy:
        p = FaultProxy("127.0.0.1", port)
        self.cleanups.append(p.close)
        return p

    def tansu(self, name: str, port: int | None = None, advertised_port: int | None = None) -> OwnTansu:
        t = OwnTansu(self.tmp_path / f"{name}.log", port=port, advertised_port=advertised_port)
        self.cleanups.append(t.stop)
        return t.start()

    def target(self, kafka_bootstrap: str | None = None) -> KafkaTarget | RabbitTarget:
        if self.broker == "kafka":
            return KafkaTarget(kafka_bootstrap or self.request.getfixturevalue("kafka_bootstrap"))
        return RabbitTarget(self.request.getfixturevalue("rabbitmq_url"), self.request.getfixturevalue("amqp_names"))

    def case(self, target: KafkaTarget | RabbitTarget | None = None, **kw: Any) -> Case:
        c = Case(dialect=self.dialect, engine=self.engine, db_url=self.db_url, target=target or self.target(),
                 tmp_path=self.tmp_path, keys=KEYS, batch=BATCH, **kw)
        self.cleanups.append(lambda: c.__exit__(None, None, None))
        return c


def _empty(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for t in TABLES.all():
            conn.execute(t.delete())


@pytest.fixture
def env_for(request: pytest.FixtureRequest, database_urls: dict[str, str], _migrated_engines: dict[str, sa.Engine],
            tmp_path: Path) -> Iterator[Callable[[str, str], Env]]:
    made: list[Env] = []

    def make(dialect: str, broker: str) -> Env:
        engine = _migrated_engines[dialect]
        _empty(engine)
        e = Env(dialect, broker, engine, database_urls[dialect], tmp_path, request)
        made.append(e)
        return e

    yield make
    for e in made:
        for fn in reversed(e.cleanups):
            with contextlib.suppress(Exception):
                fn()
        with contextlib.suppress(Exception):
            _empty(e.engine)


# ------------------------------------------------------------------ the faults


def two_relays(c: Case, **kw: Any) -> tuple[Any, Any]:
    a, b = c.relay("A", **kw), c.relay("B", **kw)
    a.wait_started()
    b.wait_started()
    c.wait_balanced(2)
    return a, b


def sigkill_mid_batch(env: Env) -> Case:
    """Two relays; A is SIGKILLed after publishing a batch and before marking it. B takes A's partitions over."""
    c = env.case()
    a, _b = two_relays(c)
    a.arm("after_publish", "kill")
    c.write(N)
    a.wait_point("after_publish")
    wait_until(lambda: not a.alive, 10, "A to die")
    c.faults = 1
    return c


def _kafka_timeouts(env: Env, message_timeout_ms: int) -> list[str]:
    return ["-X", f"message.timeout.ms={message_timeout_ms}"] if env.broker == "kafka" else []


def sigstop_after_claim(env: Env) -> Case:
    """Two relays, lease TTL 3 s, publish timeout 5 s; A is SIGSTOPped right after a claim, past TTL + guard.

    The freeze lasts at least TTL + publish timeout + 4 s (so B's takeover guard has run out), and
    ends once B has sent everything but A's claimed rows (or after 20 s).
    """
    c = env.case()
    a, _b = two_relays(c, extra=_kafka_timeouts(env, 4000), sets=["publish_timeout=5"])
    a.arm("after_claim", "stop")
    c.write(200)  # A claims a few rows per partition, the rest is written while it is frozen
    ev = a.wait_point("after_claim")
    a.wait_stopped_by_signal()
    c.write(N - 200)
    t = time.monotonic()
    # the freeze: no event ends it early unless B has sent all it can (then A's wake-up is the fault)
    while time.monotonic() - t < 20 and not (time.monotonic() - t >= TTL + 5 + 4 and c.pending() <= ev["rows"]):
        fault_duration(0.2)
    c.notes.append(f"A froze {time.monotonic() - t:.0f} s holding {ev['rows']} claimed rows")
    a.cont()
    c.faults = 1
    return c


def sigstop_70s_defaults(env: Env) -> Case:
    """Two relays with default settings (TTL 15 s, batch 1000); A is SIGSTOPped for 70 s right after a claim.

    70 s is past the lease TTL (15 s) plus the takeover guard (TTL + publish timeout, 45 s today)."""
    c = env.case()
    c.batch = 1000
    a, _b = two_relays(c, defaults=True)
    a.arm("after_claim", "stop")
    c.write(200)  # A claims a few rows per partition, the rest is written while it is frozen
    ev = a.wait_point("after_claim")
    a.wait_stopped_by_signal()
    c.write(3000)
    fault_duration(70)
    c.notes.append(f"A froze 70 s holding {ev['rows']} claimed rows")
    a.cont()
    c.faults = 1
    return c


def sigstop_twice(env: Env) -> Case:
    """Issue 9, item 3b ("with ttl 3 s, two 15 s freezes gave 50 keys out of order"): two relays, lease
    TTL 3 s, publish timeout 5 s; A is SIGSTOPped for 15 s right after a claim, woken, then B (which
    took A's partitions over meanwhile) is SIGSTOPped for 15 s right after a claim. Each freeze is
    past TTL + the relay's idle-in-transaction bound (publish timeout + TTL, 8 s here), so each time
    the other relay takes the frozen one's partitions over while it still holds a claimed batch."""
    c = env.case()
    a, b = two_relays(c, extra=_kafka_timeouts(env, 4000), sets=["publish_timeout=5"])
    per_freeze = (N - 400) // 2
    for frozen in (a, b):
        frozen.arm("after_claim", "stop")
        c.write(200)  # the frozen relay claims a few rows of its partitions, the rest comes during the freeze
        ev = frozen.wait_point("after_claim")
        frozen.wait_stopped_by_signal()
        c.write(per_freeze)
        fault_duration(15)
        c.notes.append(f"{frozen.name} froze 15 s holding {ev['rows']} claimed rows")
        frozen.cont()
    c.faults = 2
    return c


def _db_proxy(env: Env) -> tuple[FaultProxy, str]:
    p = env.proxy(port_of(env.db_url))
    return p, via(env.db_url, p.port)


def db_pause(env: Env) -> Case:
    """One relay reaching the database through the proxy; the link is paused 8 s (> 2 x TTL) while it marks a batch."""
    proxy, url = _db_proxy(env)
    c = env.case()
    a = c.relay("A", db_url=url)
    a.wait_started()
    a.arm("after_publish", "hold")
    c.write(N)
    a.wait_point("after_publish")
    proxy.pause()
    a.release("after_publish")
    fault_duration(8)
    proxy.resume()
    c.faults = 1
    return c


def db_cut(env: Env) -> Case:
    """One relay through the proxy; its database connections are cut 64 bytes into marking a batch."""
    proxy, url = _db_proxy(env)
    c = env.case()
    a = c.relay("A", db_url=url)
    a.wait_started()
    a.arm("after_publish", "hold")
    c.write(N)
    a.wait_point("after_publish")
    proxy.cut_after(64)
    a.release("after_publish")
    proxy.wait_for(lambda s: s.cuts >= 1, 30, "the cut")
    c.faults = 1
    return c


def broker_pause_kafka(env: Env) -> Case:
    """A tansu of our own behind the proxy; the link is paused while a batch is in flight, for longer
    than the producer's message timeout (5 s here): at least 8 s, until the relay has seen the failure."""
    port = _free()
    proxy = env.proxy(port)
    env.tansu("tansu", port=port, advertised_port=proxy.port)
    c = env.case(env.target(proxy.address))
    a = c.relay("A", extra=_kafka_timeouts(env, 5000))
    a.wait_started()
    a.arm("before_publish", "hold")
    c.write(N)
    a.wait_point("before_publish")
    proxy.pause()
    a.release("before_publish")
    t = time.monotonic()
    wait_until(lambda: "not delivered" in a.log() or "unavailable" in a.log(), 40, "the relay to see the failure")
    fault_duration(max(0.0, 8 - (time.monotonic() - t)))
    c.notes.append(f"link paused {time.monotonic() - t:.0f} s")
    proxy.resume()
    c.faults = 1
    return c


def broker_restart_kafka(env: Env) -> Case:
    """Our own tansu is killed and restarted on the same port while a claimed batch waits to be published.

    tansu keeps everything in memory: what the first broker acknowledged is gone with it, so the
    case counts only the messages written while it was down (the topic is re-created first).
    """
    t = env.tansu("tansu")
    target = env.target(t.bootstrap)
    assert isinstance(target, KafkaTarget)
    c = env.case(target)
    a = c.relay("A", extra=_kafka_timeouts(env, 5000))
    a.wait_started()
    c.write(500)
    c.wait_drained()
    c.expected.clear()
    a.arm("before_publish", "hold")
    t.stop()
    c.write(N)
    a.wait_point("before_publish")
    t.start()
    target.create()
    a.release("before_publish")
    c.notes.append("500 messages acknowledged before the restart not counted (lost with the test broker's memory)")
    c.faults = 1
    return c


def _rabbit_proxy(env: Env) -> tuple[FaultProxy, str]:
    url = env.request.getfixturevalue("rabbitmq_url")
    p = env.proxy(port_of(url))
    return p, via(url, p.port)


def broker_cut_rabbitmq(env: Env) -> Case:
    """One relay through the proxy to RabbitMQ; its connection is cut 4 KiB into publishing a batch."""
    proxy, url = _rabbit_proxy(env)
    c = env.case()
    a = c.relay("A", broker=url)
    a.wait_started()
    a.arm("before_publish", "hold")
    c.write(N)
    a.wait_point("before_publish")
    proxy.cut_after(4096)
    a.release("before_publish")
    proxy.wait_for(lambda s: s.cuts >= 1, 30, "the cut")
    c.faults = 1
    return c


def broker_reset_rabbitmq(env: Env, *, lb: bool = False) -> Case:
    """The RabbitMQ variant of a broker restart (the shared broker is never restarted): while a batch
    is being published, every connection gets an RST and new ones are refused for 3 s (the listener
    closed: ECONNREFUSED, as from a stopped broker; with ``lb``, accepted and reset at once, as a
    TCP load balancer with no healthy backend does)."""
    proxy, url = _rabbit_proxy(env)
    c = env.case()
    a = c.relay("A", broker=url)
    a.wait_started()
    a.arm("before_publish", "hold")
    c.write(N)
    a.wait_point("before_publish")
    base = proxy.stats().bytes_up
    a.release("before_publish")
    proxy.wait_for(lambda s: s.bytes_up > base + 2000, 30, "the batch to be on the wire")
    proxy.refuse(reset=lb)
    proxy.reset()
    if lb:
        proxy.wait_for(lambda s: s.refused >= 1, 30, "the relay to try to reconnect")
    fault_duration(3)
    proxy.accept()
    c.faults = 1
    return c


def broker_reset_lb_rabbitmq(env: Env) -> Case:
    return broker_reset_rabbitmq(env, lb=True)


CORRUPTIONS: dict[str, dict[str, Any]] = {
    "headers-json-string": {"headers": "x"},
    "headers-json-list": {"headers": [1, 2]},
    "partition-minus-one": {"partition": -1},
    "unknown-status": {"status": "weird"},
}


def corrupt_rows(env: Env) -> Case:
    """Four hand-corrupted rows (each with a key of its own) mixed into the stream, then one relay starts.

    Expected: every good row delivered in order; a corrupted row becomes dead with its reason (or is
    delivered); the unknown-status row is never sent (left alone, or dead with a reason).
    """
    c = env.case()
    o = TABLES.outbox
    part = N // len(CORRUPTIONS)
    for kind, values in CORRUPTIONS.items():
        c.write(part)
        seq, rid = c.write_one(f"bad-{kind}")
        with env.engine.begin() as conn:
            conn.execute(o.update().where(o.c.id == rid).values(**values))
        c.excluded[seq] = kind
    a = c.relay("A")
    a.wait_started()
    c.faults = 1
    return c


def idle_then_traffic(env: Env) -> Case:
    """RabbitMQ heartbeat 2 s; the relay idles until the broker drops its connection or 15 s pass
    (7 heartbeat intervals), then traffic comes. The proxy only watches the connection."""
    proxy, url = _rabbit_proxy(env)
    c = env.case()
    a = c.relay("A", broker=url, extra=["-X", "heartbeat=2"])
    a.wait_started()
    c.write(200)
    c.wait_drained()
    t = time.monotonic()
    while time.monotonic() - t < 15 and proxy.stats().live > 0:
        fault_duration(0.1)
    dropped = proxy.stats().live == 0
    c.notes.append(f"idle {time.monotonic() - t:.0f} s; connection {'dropped by the broker' if dropped else 'kept'}")
    c.expectations.append((not dropped, "the idle relay kept its RabbitMQ connection (heartbeats serviced)"))
    c.write(N - 200)
    c.faults = 1
    return c


def _free() -> int:
    from outbox.devbroker import free_port

    return free_port()


# ------------------------------------------------------------------ the matrix

FAULTS: dict[str, Callable[[Env], Case]] = {
    "sigkill-mid-batch": sigkill_mid_batch,
    "sigstop-after-claim": sigstop_after_claim,
    "sigstop-70s-defaults": sigstop_70s_defaults,
    "sigstop-twice": sigstop_twice,
    "db-pause": db_pause,
    "db-cut": db_cut,
    "broker-pause": broker_pause_kafka,
    "broker-restart": broker_restart_kafka,
    "broker-cut": broker_cut_rabbitmq,
    "broker-reset": broker_reset_rabbitmq,
    "broker-reset-lb": broker_reset_lb_rabbitmq,
    "corrupt-rows": corrupt_rows,
    "idle-then-traffic": idle_then_traffic,
}
#: which brokers each fault runs on (broker-restart on RabbitMQ is broker-reset: the broker is shared)
BROKERS = {"broker-pause": ("kafka",), "broker-restart": ("kafka",), "broker-cut": ("rabbitmq",),
           "broker-reset": ("rabbitmq",), "broker-reset-lb": ("rabbitmq",), "idle-then-traffic": ("rabbitmq",),
           "sigstop-70s-defaults": ("kafka",), "sigstop-twice": ("kafka",)}
DATABASES = {"sigstop-70s-defaults": ("postgresql",)}
#: faults after which per-key order is not guaranteed on a broker (the remaining windows)
ORDER_NOT_COVERED: set[tuple[str, str]] = set()  # none since the claim locks its lease rows (README "Frozen relays")

#: (fault, db, broker) -> xfail reason; None matches any
KNOWN_FAILURES: dict[tuple[str, str | None, str | None], str] = {
}


def _known(fault: str, db: str, broker: str) -> str | None:
    for (f, d, b), why in KNOWN_FAILURES.items():
        if f == fault and d in (None, db) and b in (None, broker):
            return why
    return None


def _params() -> list[Any]:
    out = []
    for fault in FAULTS:
        for db in DATABASES.get(fault, ("postgresql", "mariadb")):
            for broker in BROKERS.get(fault, ("kafka", "rabbitmq")):
                guarantee = G_NO_FENCE if (fault, broker) in ORDER_NOT_COVERED else G_FULL
                marks = [pytest.mark.faults(db=db, broker=broker, fault=fault, guarantee=guarantee),
                         getattr(pytest.mark, broker)]
                if fault in ("sigstop-70s-defaults", "sigstop-twice"):
                    marks.append(pytest.mark.slow)
                why = _known(fault, db, broker)
                if why:
                    marks.append(pytest.mark.xfail(strict=False, reason=why))
                out.append(pytest.param(db, broker, fault, id=f"{db}-{broker}-{fault}", marks=marks))
    return out


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("db", "broker", "fault"), _params())
def test_fault(db: str, broker: str, fault: str, env_for: Callable[[str, str], Env], record_case: Any) -> None:
    env = env_for(db, broker)
    c = FAULTS[fault](env)
    failure: AssertionError | None = None
    try:
        drained = c.wait_drained()
    except AssertionError as exc:  # still measure what got through, for the matrix and the report
        failure, drained = exc, time.monotonic() - c.t0
        c.notes.append(f"NOT DRAINED: {c.pending()} pending")
    r = c.result(drained_s=drained)
    bound = r.batch * max(1, r.faults)
    record_case({**r.__dict__, "bound": bound})
    print(f"\n{db}-{broker}-{fault}: {r.summary()}")
    if r.missing and isinstance(c.target, KafkaTarget):
        print("watermarks", c.target.last_watermarks)
        got = c.target.read_all()
        print("reread", len(got), [g for g in got if g[1] in r.missing_first])
        for rel in c.relays:
            print(rel.log()[-4000:])
    if failure is not None:
        raise AssertionError(f"{r.summary()}\n{failure}")
    _check(c, r, fault, broker, bound)


def _check(c: Case, r: Result, fault: str, broker: str, bound: int) -> None:
    assert r.missing == 0, f"{r.missing} committed messages never reached the broker: {r.summary()}"
    if (fault, broker) not in ORDER_NOT_COVERED:
        assert r.out_of_order == 0, f"{r.out_of_order} keys out of order: {r.summary()}"
    assert r.duplicates <= bound, f"{r.duplicates} duplicates, more than {bound}: {r.summary()}"
    if fault == "corrupt-rows":
        _check_corrupted(c, r)
    else:
        assert r.dead == 0, f"rows went dead: {r.summary()}"
    for holds, what in c.expectations:
        assert holds, f"expected: {what}; {r.summary()}"
    if fault == "idle-then-traffic":
        logs = "".join(rel.log() for rel in c.relays)
        assert "Traceback" not in logs, f"tracebacks in the relay log:\n{logs[-3000:]}"


def _check_corrupted(c: Case, r: Result) -> None:
    o = TABLES.outbox
    with c.engine.connect() as conn:
        dead_keys = set(conn.execute(sa.select(o.c.key).where(o.c.status == "dead")).scalars())
    assert all(k and k.startswith("bad-") for k in dead_keys), f"good rows went dead: {sorted(dead_keys)[:10]}"
    with c.engine.connect() as conn:
        rows = {k: (s, e) for k, s, e in conn.execute(
            sa.select(o.c.key, o.c.status, o.c.last_error).where(o.c.key.like("bad-%")))}
    for kind in CORRUPTIONS:
        key = f"bad-{kind}"
        if kind == "unknown-status":  # not pending: never sent; left alone, or made dead with a reason
            assert key in rows, "the unknown-status row was sent (it was never pending)"
            status, error = rows[key]
            assert status == "weird" or (status == "dead" and error), f"unknown-status row is now {rows[key]}"
            continue
        if key not in rows:
            continue  # delivered and deleted
        status, error = rows[key]
        assert status == "dead" and error, f"{kind}: row is {status!r} ({error!r}), want dead with a reason"
