"""Metrics and probes of ``outbox relay --http`` against the real services (issue 12, parts 1 and 2).

An ``outbox relay`` subprocess drains 10,000 messages through a TCP proxy of our own while the
test scrapes ``/metrics``; the published count must equal what reached the broker (read after the
drain with a fresh reader) and pending must fall to 0. Then the proxy refuses and resets the
broker link: ``/readyz`` must turn 503 with a reason, and 200 again once the link is back. A
password sits in the database URL all along and must never appear in a body or the log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, default_tables
from outbox.devbroker import free_port
from tests._proxy import FaultProxy

from ._harness import REPO, KafkaTarget, OwnTansu, RabbitTarget, _env, port_of, via, wait_until

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

SECRET = "Pw-" + uuid.uuid4().hex[:12]
N = 10_000


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def write(engine: sa.Engine, topic: str, n: int) -> None:
    box = Outbox()
    for i in range(0, n, 1000):
        with Session(engine) as s, s.begin():
            box.add_many(s, [OutgoingMessage(topic, {"seq": q, "key": f"k{q % 50}"}, key=f"k{q % 50}")
                             for q in range(i, min(n, i + 1000))])


@pytest.fixture
def pg_engine(database_urls: dict[str, str], _migrated_engines: dict[str, sa.Engine]) -> tuple[sa.Engine, str]:
    engine = _migrated_engines["postgresql"]
    t = default_tables()
    with engine.begin() as c:
        for table in (t.outbox, t.leases, t.relays):
            c.execute(table.delete())
    url = sa.make_url(database_urls["postgresql"]).set(password=SECRET).render_as_string(hide_password=False)
    return engine, url


def rabbit_user_with_secret(url: str) -> tuple[str, Any]:
    """``url`` with a user of this test's own whose password is SECRET (rabbitmqctl), and its cleanup.

    Without rabbitmqctl the guest user stays: its password is its name, so only the masked
    ``guest:***@`` form can be checked then.
    """
    import shutil

    ctl = shutil.which("rabbitmqctl")
    user = f"okt-{uuid.uuid4().hex[:8]}"
    if ctl is None:
        return url, lambda: None
    try:
        subprocess.run([ctl, "add_user", user, SECRET], check=True, capture_output=True, timeout=60)
        subprocess.run([ctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*"], check=True, capture_output=True,
                       timeout=60)
    except (subprocess.SubprocessError, OSError):
        return url, lambda: None
    scheme, rest = url.split("://", 1)
    return (f"{scheme}://{user}:{SECRET}@{rest.rsplit('@', 1)[-1]}",
            lambda: subprocess.run([ctl, "delete_user", user], capture_output=True, timeout=60))


def start_relay(tmp_path: Path, db_url: str, broker_args: list[str], port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "relay.log"
    cmd = [sys.executable, "-m", "outbox", "relay", "--db", db_url, *broker_args, "--http", f"127.0.0.1:{port}",
           "--metrics-interval", "0.5", "--poll-interval", "0.2", "--lease-ttl", "5", "--batch-size", "500"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=str(REPO))
    return proc, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["rabbitmq", "kafka"])
def test_relay_metrics_match_the_broker_and_readiness_follows_the_link(
    broker: str, pg_engine: tuple[sa.Engine, str], tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    engine, db_url = pg_engine
    cleanups: list[Any] = []
    try:
        if broker == "kafka":
            proxy_port = free_port()
            tansu = OwnTansu(tmp_path / "tansu.log", advertised_port=proxy_port)
            proxy = FaultProxy("127.0.0.1", tansu.port, port=proxy_port)
            cleanups += [tansu.stop, proxy.close]
            tansu.start()
            target: Any = KafkaTarget(f"127.0.0.1:{proxy_port}")
            broker_args = ["--kafka", f"127.0.0.1:{proxy_port}", "-X", "message.timeout.ms=5000"]
        else:
            rabbit_url = request.getfixturevalue("rabbitmq_url")
            target = RabbitTarget(rabbit_url, request.getfixturevalue("amqp_names"))
            proxy = FaultProxy("127.0.0.1", port_of(rabbit_url))
            cleanups.append(proxy.close)
            secret_url, drop_user = rabbit_user_with_secret(rabbit_url)
            cleanups.append(drop_user)
            broker_args = ["--rabbitmq", via(secret_url, proxy.port)]
        topic = target.topic
        write(engine, topic, N)
        port = free_port()
        proc, log = start_relay(tmp_path, db_url, broker_args, port)
        cleanups.insert(0, lambda: stop(proc))
        base = f"http://127.0.0.1:{port}"
        bodies: list[str] = []

        def drained() -> bool:
            code, text = get(base + "/metrics")
            if code != 200:
                assert proc.poll() is None, log.read_text()
                return False
            bodies.append(text)
            return (value(text, "outbox_relay_messages_published_total", topic=topic) == N
                    and value(text, "outbox_relay_rows", topic=topic, state="pending") == 0)

        wait_until(drained, 180, f"the relay to publish {N} messages and report 0 pending", interval=0.5)
        text = bodies[-1]
        assert value(text, "outbox_relay_leases_held") and value(text, "outbox_relay_leases_held") > 0
        assert value(text, "outbox_relay_batch_size_count") >= N / 500
        assert value(text, "outbox_relay_delivery_latency_seconds_count") == N
        assert value(text, "outbox_info", version=value_of_version(text), component="relay") == 1
        wait_until(lambda: get(base + "/readyz")[0] == 200, 30, "/readyz to be 200 while the broker is up")
        assert get(base + "/healthz")[0] == 200

        # the broker link goes: refused and reset; readiness says so with a reason
        proxy.refuse()
        proxy.reset()
        got: list[tuple[int, str]] = []

        def unready() -> bool:
            got.append(get(base + "/readyz"))
            return got[-1][0] == 503

        wait_until(unready, 60, "/readyz to turn 503 once the broker link is cut", interval=0.3)
        doc = json.loads(got[-1][1])
        assert doc["status"] == "unhealthy" and "broker" in doc["checks"], doc
        assert get(base + "/healthz")[0] == 200  # the loop still turns: alive, not ready
        bodies += [got[-1][1], get(base + "/healthz")[1], get(base + "/metrics")[1]]

        proxy.accept()
        wait_until(lambda: get(base + "/readyz")[0] == 200, 90, "/readyz to be 200 again after the link returns",
                   interval=0.3)
        bodies.append(get(base + "/readyz")[1])
        stop(proc)

        # what arrived, read after the drain with a fresh reader
        arrived = target.read_all(timeout=60)
        assert len({seq for _k, seq in arrived}) == N
        assert len(arrived) == N  # a clean drain: each once, as /metrics counted
        for body in [*bodies, log.read_text()]:
            assert SECRET not in body
        assert "guest:guest@" not in log.read_text()
    finally:
        for c in cleanups:
            c()


def value_of_version(text: str) -> str:
    for (name, labels), _v in samples(text).items():
        if name == "outbox_info":
            return dict(labels)["version"]
    raise AssertionError("no outbox_info in /metrics")


def test_metrics_show_rows_blocked_behind_a_dead_message(pg_engine: tuple[sa.Engine, str]) -> None:
    """One dead message blocks its key (strict ordering): the row gauges show the blocked rows, and
    outbox_relay_blocking_rows names the blocking row (topic, key, row id); requeued, it goes away."""
    from outbox.observability.health import Health
    from outbox.observability.http import MetricsServer
    from outbox.observability.metrics import RelayMetrics, StatusPoller

    engine, _ = pg_engine
    topic = f"blocked-{uuid.uuid4().hex[:8]}"
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add_many(s, [OutgoingMessage(topic, {"i": i}, key="poison" if i < 3 else f"ok{i}") for i in range(5)])
    o = default_tables().outbox
    with engine.begin() as c:
        first = c.execute(sa.select(sa.func.min(o.c.id)).where(o.c.topic == topic)).scalar_one()
        c.execute(o.update().where(o.c.id == first).values(status="dead", last_error="too large", attempts=1))
    metrics = RelayMetrics()
    poller = StatusPoller(engine, metrics, interval=60)
    poller.poll_once()
    assert poller.db_problem is None
    server = MetricsServer(metrics.registry, Health(live_within=60), port=0).start()
    try:
        code, text = get(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.stop()
    assert code == 200
    assert value(text, "outbox_relay_rows", topic=topic, state="dead") == 1
    assert value(text, "outbox_relay_rows", topic=topic, state="blocked") == 2
    assert value(text, "outbox_relay_rows", topic=topic, state="due") == 2  # the other keys
    assert value(text, "outbox_relay_rows", topic=topic, state="pending") == 4
    assert value(text, "outbox_relay_blocked_keys", topic=topic) == 1
    assert value(text, "outbox_relay_oldest_pending_age_seconds") > 0
    assert value(text, "outbox_relay_blocking_rows", topic=topic, key="poison", blocking_id=str(first)) == 2
    with engine.begin() as c:  # requeued: nothing blocks any more, and its series is gone
        c.execute(o.update().where(o.c.id == first).values(status="pending", attempts=0))
    poller.poll_once()
    text = metrics_text(metrics)
    assert not [k for k in samples(text) if k[0] == "outbox_relay_blocking_rows" and ("topic", topic) in k[1]], text
    assert value(text, "outbox_relay_rows", topic=topic, state="blocked") == 0


def test_a_created_at_no_datetime_holds_does_not_fail_the_poll(pg_engine: tuple[sa.Engine, str]) -> None:
    """A hand-written '-infinity' created_at (the minimum: it is what the oldest-age query reads) in a
    pending row, and an 'infinity' one behind a dead row: the poll still counts, and reports the database up."""
    from outbox.observability.metrics import RelayMetrics, StatusPoller

    engine, _ = pg_engine
    topic = f"inf-{uuid.uuid4().hex[:8]}"
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add_many(s, [OutgoingMessage(topic, {"i": i}, key="k") for i in range(3)])
    o = default_tables().outbox
    with engine.begin() as c:
        ids = sorted(c.execute(sa.select(o.c.id).where(o.c.topic == topic)).scalars())
        c.execute(o.update().where(o.c.id == ids[0]).values(status="dead", last_error="x", attempts=1))
        c.execute(sa.text("UPDATE outbox_messages SET created_at = '-infinity' WHERE id = :i"), {"i": ids[1]})
        c.execute(sa.text("UPDATE outbox_messages SET created_at = 'infinity' WHERE id = :i"), {"i": ids[2]})
    metrics = RelayMetrics()
    poller = StatusPoller(engine, metrics, interval=60)
    try:
        poller.poll_once()
        assert poller.db_problem is None
        text = metrics_text(metrics)
        assert value(text, "outbox_relay_rows", topic=topic, state="blocked") == 2
        assert value(text, "outbox_relay_oldest_pending_age_seconds") >= 0
    finally:
        with engine.begin() as c:
            c.execute(o.delete().where(o.c.topic == topic))


def metrics_text(metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_error_codes_are_bounded() -> None:
    from outbox.observability.metrics import error_code

    assert error_code("KafkaError MSG_SIZE_TOO_LARGE: Broker: Message size too large") == "too_large"
    assert error_code("UNKNOWN_TOPIC_OR_PART: Broker: Unknown topic or partition") == "unknown_topic"
    assert error_code("NOT_FOUND - no exchange 'x' in vhost '/'") == "unknown_topic"
    assert error_code("message unroutable (NO_ROUTE)") == "unroutable"
    assert error_code("_TIMED_OUT: Local: Message timed out") == "timeout"
    assert error_code("Connection refused") == "broker_unavailable"
    assert error_code("(psycopg.OperationalError) server closed") == "broker_unavailable"  # first match wins
    assert error_code("a handler said no") == "other"
