"""Transports: lazy imports, the registry (built-ins and entry points), the CLI's --broker, and the
row's created_at as the broker timestamp on real Kafka and RabbitMQ."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import ConfigurationError, Outbox, default_tables
from outbox.cli import main
from outbox.config import RelayConfig
from outbox.relay import Relay
from outbox.transports import get, names, register

ROOT = Path(__file__).resolve().parents[2]
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "progress_interval": 0, "lease_ttl": 3.0}
STAMP = dt.datetime(2021, 2, 3, 4, 5, 6, 789000, tzinfo=dt.timezone.utc)


def _python(code: str, *, path: list[str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*(path or []), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=cwd)


def test_the_writer_and_the_memory_publisher_load_no_broker_client() -> None:
    out = _python(textwrap.dedent("""
        import sys
        import outbox
        outbox.Outbox
        from outbox.brokers.memory import MemoryPublisher
        import outbox.brokers, outbox.transports
        from outbox.transports import get
        get("kafka"), get("rabbitmq"), get("memory")
        import consumers
        print(sorted(m for m in ("confluent_kafka", "pika") if m in sys.modules))
    """))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # and the adapters still load where they are asked for, under old and new paths
    loaded = _python("import sys; from outbox.brokers import KafkaPublisher; from consumers import RabbitMQRunner; "
                     "import outbox.brokers.kafka as a, outbox.transports.kafka.publisher as b; "
                     "print(a is b, 'confluent_kafka' in sys.modules, 'pika' in sys.modules)")
    assert loaded.stdout.split() == ["True", "True", "True"], loaded.stderr


def test_registry_names_unknown_name_and_runtime_registration() -> None:
    assert {"kafka", "rabbitmq", "memory"} <= set(names())
    assert get("kafka").binding == "kafka" and get("rabbitmq").binding == "amqp"
    with pytest.raises(ConfigurationError, match=r"unknown transport 'nats'; registered: .*kafka, memory, rabbitmq"):
        get("nats")
    name = f"t{uuid.uuid4().hex[:8]}"
    register(name, lambda: get("memory"))
    assert name in names() and get(name) is get("memory")
    with pytest.raises(ConfigurationError, match="lower-case"):
        register("Bad", get("memory"))


def test_cli_unknown_broker_lists_the_registered_ones_and_hides_passwords(capsys) -> None:
    assert main(["relay", "--db", "sqlite://", "--broker", "nats", "--broker-url", "nats://u:hunter2@h"]) == 2
    err = capsys.readouterr().err
    assert "unknown transport 'nats'" in err and "kafka, memory, rabbitmq" in err and "hunter2" not in err
    assert main(["relay", "--db", "sqlite://", "--broker", "kafka"]) == 2
    assert "--broker kafka needs --broker-url" in capsys.readouterr().err
    assert main(["relay", "--db", "sqlite://", "--broker", "kafka", "--broker-url", "h:1", "--rabbitmq",
                 "amqp://h/"]) == 2
    assert "choose one broker" in capsys.readouterr().err
    assert main(["consume", "x:C", "--db", "sqlite://", "--broker", "rabbitmq", "--broker-url", "amqp://h/"]) == 2
    assert "needs --queue" in capsys.readouterr().err


ACME = '''
import os, signal

from outbox.transports.base import Outcome, PublishResult


class _Publisher:
    def __init__(self, target, settings):
        self.target, self.settings = target, dict(settings)

    def start(self):
        pass

    def publish(self, records, *, timeout=30.0):
        with open(os.environ["ACME_OUT"], "a") as f:
            for r in records:
                f.write(f"{self.target} {self.settings.get('flavour')} {r.topic} {r.message_id}\\n")
        os.kill(os.getpid(), signal.SIGTERM)  # the relay finishes this batch, then leaves
        return [PublishResult(r.id, Outcome.DELIVERED) for r in records]

    def flush(self, timeout=30.0):
        pass

    def close(self, timeout=10.0):
        pass


class _Transport:
    name = "acme"
    binding = "kafka"
    options = dict

    def publisher(self, target, settings, *, codec, **relay_opts):
        return _Publisher(target, settings)

    def runner(self, consumer, **opts):
        raise NotImplementedError


TRANSPORT = _Transport()
'''


def test_a_third_party_transport_from_an_entry_point_runs_under_outbox_relay(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "acme_transport-1.0.dist-info").mkdir(parents=True)
    (site / "acme_transport.py").write_text(ACME)
    (site / "acme_transport-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-transport\n"
                                                                     "Version: 1.0\n")
    (site / "acme_transport-1.0.dist-info" / "entry_points.txt").write_text(
        "[outboxkit.transports]\nacme = acme_transport:TRANSPORT\n")
    db = f"sqlite:///{tmp_path / 'acme.db'}"
    from outbox import migrations

    migrations.upgrade(db)
    engine = sa.create_engine(db)
    with Session(engine) as s, s.begin():
        mid = Outbox().add(s, "orders", {"n": 1})
    engine.dispose()
    out_file = tmp_path / "published.txt"
    listed = _python("from outbox.transports import names; print(names())", path=[str(site)])
    assert "'acme'" in listed.stdout, listed.stderr
    run = subprocess.run(
        [sys.executable, "-m", "outbox", "relay", "--db", db, "--broker", "acme", "--broker-url", "acme://box-1",
         "-X", "flavour=plum", "--poll-interval", "0.05"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "ACME_OUT": str(out_file)},
    )
    assert run.returncode == 0, run.stderr
    assert out_file.read_text().split() == ["acme://box-1", "plum", "orders", str(mid)]


# ------------------------------------------------------------------ broker timestamp = created_at


def _write_old_row(engine: sa.Engine, topic: str) -> uuid.UUID:
    with Session(engine) as s, s.begin():
        mid = Outbox().add(s, topic, {"n": 1}, key="k")
    t = default_tables().outbox
    with engine.begin() as c:
        c.execute(sa.update(t).where(t.c.message_id == mid).values(created_at=STAMP))
    return mid


def _relay(engine: sa.Engine, publisher) -> None:
    relay = Relay(engine, publisher, config=RelayConfig(**FAST))
    try:
        assert relay.drain(timeout=60) == 1
    finally:
        relay.close()


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_kafka_timestamp_is_the_rows_created_at(engine: sa.Engine, kafka_bootstrap: str, kafka_topic: str) -> None:
    from confluent_kafka import TIMESTAMP_CREATE_TIME, Consumer

    from outbox.transports.kafka import KafkaPublisher

    mid = _write_old_row(engine, kafka_topic)
    _relay(engine, KafkaPublisher(bootstrap_servers=kafka_bootstrap))
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    try:
        c.subscribe([kafka_topic])
        got = None
        for _ in range(60):
            m = c.poll(1.0)
            if m is not None and m.error() is None:
                got = m
                break
        assert got is not None, "nothing read back"
        assert dict(got.headers())["message-id"] == str(mid).encode()
        kind, millis = got.timestamp()
        assert kind == TIMESTAMP_CREATE_TIME
        assert millis == int(STAMP.timestamp() * 1000)
    finally:
        c.close()


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_amqp_timestamp_is_the_rows_created_at(engine: sa.Engine, rabbitmq_url: str, amqp_names) -> None:
    import pika

    from outbox.transports.rabbitmq import RabbitMQPublisher, declare_queue

    declare_queue(rabbitmq_url, amqp_names["queue"], exchange=amqp_names["exchange"])
    mid = _write_old_row(engine, amqp_names["exchange"])
    _relay(engine, RabbitMQPublisher(url=rabbitmq_url))
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        ch = conn.channel()
        method, props, _body = next(ch.consume(amqp_names["queue"], inactivity_timeout=30))
        assert method is not None, "nothing read back"
        assert props.message_id == str(mid)
        assert props.timestamp == int(STAMP.timestamp())
        ch.basic_ack(method.delivery_tag)
        ch.cancel()
    finally:
        conn.close()
