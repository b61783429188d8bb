"""Every example runs the way its docstring says, as a subprocess, and prints what it promises.

On SQLite (each example's default, no settings) and on a fresh PostgreSQL database, twice there (an
example must also run again on a persistent database), and with each broker an example uses:
03 (the relay) on the bundled Kafka-protocol broker, on Kafka and on RabbitMQ; 04 under
``outbox consume`` on Kafka and on RabbitMQ; the asyncio examples 06 (FastAPI + relay) and 07
(FastStream + AsyncDedupConsumer) on the bundled broker with aiosqlite, and on Kafka with
PostgreSQL through asyncpg (06) and psycopg (07).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
pytestmark = pytest.mark.timeout(240)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update(extra)
    return env


def run_example(name: str, cwd: Path, timeout: float = 120, **env: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, cwd=cwd,
                          env=_env(**env), timeout=timeout)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def outbox_cmd() -> list[str]:
    script = Path(sys.executable).with_name("outbox")
    return [str(script)] if script.exists() else [sys.executable, "-m", "outbox"]


@pytest.fixture
def pg_url(fresh_database: str) -> str:
    return fresh_database


def _check_01(out: str) -> None:
    assert re.search(r"^committed order \d+ and its message [0-9a-f-]{36}$", out, re.M), out
    assert "rolled back: payment declined" in out
    assert "orders of this run in the database: 1; their outbox rows waiting for the relay: 1" in out


def _check_02(out: str) -> None:
    assert re.search(r"POST valid  -> \{'status': 201, 'order_id': \d+", out), out
    assert "POST bad    -> {'status': 400, 'error': \"InvalidKey: key must be 1-255 UTF-8 bytes" in out
    assert "POST broken -> {'status': 400, 'error': \"KeyError: 'sku'\"}" in out
    assert "the valid order is stored: True, with its outbox row: True; orders of the bad request: 0" in out


def _check_04(out: str) -> None:
    assert re.search(r"delivery 1: processed, result \{'charge_id': 'ch_\w+'\}", out), out
    assert out.count(": duplicate, result {'charge_id': 'ch_") == 2, out
    assert "charges for the order: 1" in out


def _check_05(out: str) -> None:
    assert "first delivery: dead" in out and "redelivery: processed" in out, out
    assert out.count("reserved stock") == 1
    assert "reservations for the order: 1" in out


CHECKS = {
    "01_writer_sqlalchemy.py": ("OUTBOX_DB_URL", _check_01),
    "02_writer_async_web.py": ("OUTBOX_ASYNC_DB_URL", _check_02),
    "04_dedup_consumer.py": ("OUTBOX_DB_URL", _check_04),
    "05_staged_consumer.py": ("OUTBOX_DB_URL", _check_05),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_on_its_defaults(name: str, tmp_path: Path) -> None:
    _, check = CHECKS[name]
    check(run_example(name, tmp_path))


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_on_postgresql_fresh_then_again(name: str, pg_url: str, tmp_path: Path) -> None:
    var, check = CHECKS[name]
    for _ in range(2):  # a fresh database, then the same one again
        check(run_example(name, tmp_path, **{var: pg_url}))


RELAY_OUT = re.compile(r"published (\d+) of this run's (\d+) messages in [\d.]+ s \(relay totals: "
                       r"published (\d+), dead (\d+)\)")


def _check_03(out: str, n: int) -> None:
    assert f"committed {n} messages" in out, out
    m = RELAY_OUT.search(out)
    assert m, out
    assert int(m[1]) == int(m[2]) == n and int(m[3]) >= n and int(m[4]) == 0, out


def test_relay_example_on_its_defaults_with_the_bundled_broker(tmp_path: Path) -> None:
    out = run_example("03_relay.py", tmp_path, OUTBOX_EXAMPLE_MESSAGES="300")
    assert "started the bundled Kafka-protocol broker on 127.0.0.1:" in out
    _check_03(out, 300)


@pytest.mark.kafka
@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_relay_example_on_postgresql_and_kafka(pg_url: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = f"example-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        out = run_example("03_relay.py", tmp_path, OUTBOX_DB_URL=pg_url, OUTBOX_KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
                          OUTBOX_EXAMPLE_MESSAGES="300", OUTBOX_EXAMPLE_TOPIC=topic)
        assert "bundled" not in out
        _check_03(out, 300)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_relay_example_on_postgresql_and_rabbitmq(pg_url: str, rabbitmq_url: str, amqp_names: dict[str, str],
                                                  tmp_path: Path) -> None:
    names = {"OUTBOX_EXAMPLE_TOPIC": amqp_names["exchange"], "OUTBOX_EXAMPLE_QUEUE": amqp_names["queue"]}
    for _ in range(2):
        out = run_example("03_relay.py", tmp_path, OUTBOX_DB_URL=pg_url, OUTBOX_RABBITMQ_URL=rabbitmq_url,
                          OUTBOX_EXAMPLE_MESSAGES="300", **names)
        assert f"bound queue {amqp_names['queue']!r} to exchange {amqp_names['exchange']!r}" in out
        _check_03(out, 300)
        assert f"queue {amqp_names['queue']!r} received 300 messages (deleted it)" in out


# ------------------------------------------------------------------ 04 under `outbox consume`

ORDERS = [("o-a", "m-a"), ("o-a", "m-a"), ("o-b", "m-b"), ("o-a", "m-a")]  # o-a delivered three times


def _charges(url: str) -> dict[str, int]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("example_charges"):
                return {}
            return {r.order_id: r.n for r in conn.execute(sa.text(
                "SELECT order_id, COUNT(*) AS n FROM example_charges GROUP BY order_id"))}
    finally:
        engine.dispose()


@pytest.fixture
def consume_run(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[str]] = []

    def start(url: str, *broker_args: str) -> subprocess.Popen[str]:
        setup = subprocess.run([*outbox_cmd(), "db", "upgrade", "--db", url], capture_output=True, text=True,
                               cwd=REPO, env=_env(), timeout=120)
        assert setup.returncode == 0, setup.stdout + setup.stderr
        proc = subprocess.Popen([*outbox_cmd(), "consume", "examples.04_dedup_consumer:ChargeOrder", "--db", url,
                                 *broker_args], cwd=REPO, env=_env(), text=True,
                                stdout=(tmp_path / "out.txt").open("w"), stderr=(tmp_path / "err.txt").open("w"))
        procs.append(proc)
        return proc

    def finish(proc: subprocess.Popen[str], url: str) -> None:
        deadline = time.monotonic() + 90
        while _charges(url) != {"o-a": 1, "o-b": 1} and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # waiting for a condition in another process, with a deadline
        err = (tmp_path / "err.txt").read_text()
        assert _charges(url) == {"o-a": 1, "o-b": 1}, f"rc={proc.poll()}\n{err}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "err.txt").read_text()
        err = (tmp_path / "err.txt").read_text()
        assert "Traceback" not in err and "no such table" not in err, err

    yield start, finish
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.kafka
def test_dedup_example_under_outbox_consume_on_kafka(consume_run: object, kafka_bootstrap: str, kafka_topic: str,
                                                    tmp_path: Path) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for order_id, mid in ORDERS:  # one partition, so the copies arrive in this order
        producer.produce(kafka_topic, json.dumps({"order_id": order_id, "total": 42}).encode(), key=order_id,
                         partition=0, headers=[("message-id", mid.encode()), ("content-type", b"application/json")])
    assert producer.flush(30) == 0
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    start, finish = consume_run  # type: ignore[misc]
    proc = start(url, "--kafka", kafka_bootstrap, "--topic", kafka_topic, "--group", f"billing-{uuid.uuid4().hex[:6]}",
                 "--consumer-config", "session.timeout.ms=6000")
    finish(proc, url)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_dedup_example_under_outbox_consume_on_rabbitmq(consume_run: object, pg_url: str, rabbitmq_url: str,
                                                       amqp_names: dict[str, str]) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        ch = conn.channel()
        ch.queue_declare(amqp_names["queue"], durable=True)
        for order_id, mid in ORDERS:
            ch.basic_publish("", amqp_names["queue"], json.dumps({"order_id": order_id, "total": 42}).encode(),
                             pika.BasicProperties(message_id=mid, content_type="application/json", delivery_mode=2))
    finally:
        conn.close()
    start, finish = consume_run  # type: ignore[misc]
    proc = start(pg_url, "--rabbitmq", rabbitmq_url, "--queue", amqp_names["queue"])
    finish(proc, pg_url)


# ------------------------------------------------------------------ 06 and 07: the asyncio examples


def _check_06(out: str) -> None:
    assert re.search(r"^POST /orders: 20 of 20 created \(201\); a 300-byte customer key: 400 InvalidKey: key must be",
                     out, re.M), out
    assert "an empty sku and qty 0: 422" in out, out
    m = re.search(r"the relay published (\d+) of this run's (\d+) messages to '[^']+' "
                  r"\(relay totals: published (\d+), dead (\d+)\)", out)
    assert m and int(m[1]) == int(m[2]) == 20 and int(m[3]) >= 20 and int(m[4]) == 0, out
    assert ("orders of this run in the database: 20; refused orders stored: 0; "
            "this run's outbox rows left (published rows are deleted): 0") in out, out
    assert "every order committed with its message, and every message published" in out, out


def _check_07(out: str) -> None:
    first = re.search(r"^order 1: processed, result (\{'charge_id': 'ch_\w+-1'\})$", out, re.M)
    assert first, out
    assert f"order 1 again: duplicate, result {first[1]}" in out, out  # the stored result, not a second charge
    assert re.search(r"^order 2 \(gateway busy once\): retry \(PaymentGatewayBusy\) -> processed, result "
                     r"\{'charge_id': 'ch_\w+-2'\}$", out, re.M), out
    assert "not JSON: dead (DecodeError)" in out, out
    assert ("order 3 (gateway always busy): retry (PaymentGatewayBusy) -> retry (PaymentGatewayBusy) -> "
            "dead (PaymentGatewayBusy)") in out, out  # max_attempts = 3 tries, counted across redeliveries
    assert re.search(r"^order 4: processed, result \{'charge_id': 'ch_\w+-4'\}$", out, re.M), out
    assert re.search(r"^charges of this run: 3 \(\w+-1, \w+-2, \w+-4\)$", out, re.M), out
    assert "dead letter: 1 tries, DecodeError\ndead letter: 3 tries, PaymentGatewayBusy\n" in out, out
    assert "all records settled as expected" in out, out


ASYNC_CHECKS = {"06_fastapi_orders.py": _check_06, "07_faststream_consumer.py": _check_07}


@pytest.mark.parametrize("name", sorted(ASYNC_CHECKS))
def test_async_example_on_its_defaults(name: str, tmp_path: Path) -> None:
    out = run_example(name, tmp_path)
    assert "started the bundled Kafka-protocol broker on 127.0.0.1:" in out
    ASYNC_CHECKS[name](out)


@pytest.mark.kafka
@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize(("name", "driver"), [("06_fastapi_orders.py", "asyncpg"),
                                              ("07_faststream_consumer.py", "psycopg")])
def test_async_example_on_postgresql_and_kafka_fresh_then_again(name: str, driver: str, pg_url: str,
                                                                kafka_bootstrap: str, kafka_topic: str,
                                                                tmp_path: Path) -> None:
    url = sa.make_url(pg_url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    for _ in range(2):  # a fresh database, then the same one (and the same topic, the same group) again
        out = run_example(name, tmp_path, OUTBOX_ASYNC_DB_URL=url, OUTBOX_KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
                          OUTBOX_EXAMPLE_TOPIC=kafka_topic, OUTBOX_EXAMPLE_GROUP=f"billing-{uuid.uuid4().hex[:6]}")
        assert "bundled" not in out
        ASYNC_CHECKS[name](out)


def test_every_example_is_tested() -> None:
    tested = set(CHECKS) | set(ASYNC_CHECKS) | {"03_relay.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
