"""Ids from other producers under ``outbox consume``, default id sources, no subclass override of ids.

Each message is delivered twice (produced twice by a client this project did not write) and must
have exactly one effect, counted in the handler's own table. A last ``end`` message on the same
partition / queue tells the test that every copy before it was consumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[3]

CONSUMER = textwrap.dedent('''
    import sqlalchemy as sa
    from consumers import DedupConsumer

    EFFECTS = sa.Table("idsrc_effects", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                       sa.Column("message_id", sa.String(255), nullable=False),
                       sa.Column("label", sa.String(100), nullable=False))


    class Effects(DedupConsumer):
        name = "idsrc.effects"
        max_attempts = 1

        def handle(self, session, message):
            label = message.body.get("label", "?") if isinstance(message.body, dict) else "?"
            session.execute(EFFECTS.insert().values(message_id=message.id, label=label))
''')


def _effects(url: str) -> list[tuple[str, str]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("idsrc_effects"):
                return []
            return [(r[0], r[1]) for r in conn.execute(sa.text("SELECT message_id, label FROM idsrc_effects"))]
    finally:
        engine.dispose()


def _dead(url: str) -> list[dict[str, object]]:
    from consumers import list_dead_letters

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return list_dead_letters(engine, consumer="idsrc.effects")
    finally:
        engine.dispose()


@pytest.fixture
def consume(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Callable[[int], list[tuple[str, str]]]]]]:
    """``start(*broker_args)`` -> (db url, ``finish(n)``): runs ``outbox consume idsrc_mod:Effects``."""
    (tmp_path / "idsrc_mod.py").write_text(CONSUMER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    procs: list[subprocess.Popen[bytes]] = []

    def start(*broker_args: str) -> tuple[str, Callable[[int], list[tuple[str, str]]]]:
        url = f"sqlite:///{tmp_path / f'ids-{len(procs)}.db'}"
        up = subprocess.run([sys.executable, "-m", "outbox", "db", "upgrade", "--db", url], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
        assert up.returncode == 0, up.stderr
        eng = sa.create_engine(url)
        sys.path.insert(0, str(tmp_path))
        try:
            import idsrc_mod  # the consumer's own table, created by the test as a service would

            idsrc_mod.EFFECTS.metadata.create_all(eng)
        finally:
            sys.path.remove(str(tmp_path))
            eng.dispose()
        err = tmp_path / f"err-{len(procs)}.txt"
        proc = subprocess.Popen([sys.executable, "-m", "outbox", "consume", "idsrc_mod:Effects", "--db", url,
                                 "--requeue-interval", "3600", *broker_args], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err.open("wb"))
        procs.append(proc)

        def finish(expected_dead: int = 0) -> list[tuple[str, str]]:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None:  # another process: poll with a deadline
                if any(label == "end" for _, label in _effects(url)) and len(_dead(url)) >= expected_dead:
                    break
                time.sleep(0.2)
            text = err.read_text()
            assert any(label == "end" for _, label in _effects(url)), f"rc={proc.poll()}\n{text[-3000:]}"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, err.read_text()[-3000:]
            text = err.read_text()
            assert "Traceback" not in text, text[-3000:]
            return _effects(url)

        return url, finish

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def _one_effect_each(effects: list[tuple[str, str]], labels: list[str]) -> None:
    by_label: dict[str, list[str]] = {}
    for mid, label in effects:
        by_label.setdefault(label, []).append(mid)
    for label in labels:
        assert len(by_label.get(label, [])) == 1, f"{label}: {by_label.get(label)} (all: {by_label})"
    assert len(effects) == len(labels) + 1, by_label  # + the end marker, nothing else


# ------------------------------------------------------------------ Kafka


@pytest.mark.kafka
def test_kafka_ids_from_other_producers(consume, kafka_bootstrap: str, kafka_topic: str) -> None:
    from cloudevents.core.bindings import kafka as ce_kafka
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def send(label: str, headers: list[tuple[str, bytes]], copies: int = 2, payload: bytes | None = None) -> None:
        for _ in range(copies):  # one partition: the copies and the end marker keep their order
            producer.produce(kafka_topic, payload or json.dumps({"label": label}).encode(), key=b"k", partition=0,
                             headers=[*headers, ("content-type", b"application/json")])

    send("warm-up", [("message-id", b"warm-up")], copies=1)  # tansu: a partition's first record can vanish
    send("debezium", [("id", str(uuid.uuid4()).encode())])
    event = CloudEvent(attributes={"id": f"ce-{uuid.uuid4()}", "type": "com.example.order.placed",
                                   "source": "/orders", "datacontenttype": "application/json"},
                       data={"label": "cloudevents"})
    km = ce_kafka.to_binary(event, JSONFormat())
    assert "ce_id" in km.headers
    for _ in range(2):
        producer.produce(kafka_topic, km.value, key=b"k", partition=0, headers=list(km.headers.items()))
    send("bad-utf8-a", [("id", b"\xff\xfe\xfd\xfc")])  # both decode to U+FFFD with errors="replace"
    send("bad-utf8-b", [("id", b"\x80\x81\x82\x83")])
    send("no-id", [], copies=1)
    send("end", [("message-id", b"end-" + uuid.uuid4().hex.encode())], copies=1)
    assert producer.flush(30) == 0

    url, finish = consume("--kafka", kafka_bootstrap, "--topic", kafka_topic, "--group", f"g-{uuid.uuid4().hex[:8]}",
                          "-X", "session.timeout.ms=6000")
    effects = finish(1)
    labels = ["debezium", "cloudevents", "bad-utf8-a", "bad-utf8-b"]
    effects = [e for e in effects if e[1] != "warm-up"]
    _one_effect_each(effects, labels)
    ids = dict((label, mid) for mid, label in effects)
    assert ids["cloudevents"] == event.get_id()  # the SDK's id, as it wrote it
    assert ids["bad-utf8-a"] == "~x:%FF%FE%FD%FC" and ids["bad-utf8-b"] == "~x:%80%81%82%83"
    dead = _dead(url)
    assert len(dead) == 1 and dead[0]["message_id"] is None
    assert "no message id (tried header:message-id, cloudevents, header:id, message_id)" in str(dead[0]["error"])


# ------------------------------------------------------------------ RabbitMQ


def _declare(rabbitmq_url: str, names: dict[str, str]) -> None:
    from outbox.transports.rabbitmq.runner import declare_queue

    declare_queue(rabbitmq_url, names["queue"], exchange=names["exchange"])


def _publish(rabbitmq_url: str, exchange: str, items: list[tuple[dict[str, object], str | None, bytes, str | None]]
             ) -> None:
    """Plain pika: (headers, message_id property, body, content_type) per message, with publisher confirms."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for headers, message_id, body, ctype in items:
            ch.basic_publish(exchange, "rk", body, pika.BasicProperties(
                headers=headers or None, message_id=message_id, content_type=ctype, delivery_mode=2))
    finally:
        conn.close()


@pytest.mark.rabbitmq
def test_rabbitmq_ids_from_other_producers(consume, rabbitmq_url: str, amqp_names: dict[str, str]) -> None:
    from cloudevents.core.bindings import amqp as ce_amqp
    from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent

    _declare(rabbitmq_url, amqp_names)

    def event(label: str) -> CloudEvent:
        return CloudEvent(attributes={"id": f"{label}-{uuid.uuid4()}", "type": "com.example.t", "source": "/s",
                                      "datacontenttype": "application/json"}, data={"label": label})

    ev_amqp, ev_rmq = event("ce-amqp"), event("ce-rabbitmq")
    am = ce_amqp.to_binary(ev_amqp, JSONFormat())  # AMQP convention: cloudEvents_ application properties
    assert "cloudEvents_id" in am.application_properties
    rm = ce_rabbitmq.to_binary(ev_rmq, JSONFormat())  # the SDK's RabbitMQ binding: ce- headers
    items: list[tuple[dict[str, object], str | None, bytes, str | None]] = []
    for _ in range(2):
        items.append((dict(am.application_properties), None, am.application_data, am.properties.get("content-type")))
    for _ in range(2):
        items.append((dict(rm.headers), None, rm.body, rm.content_type))
    amqp_only = f"amqp-{uuid.uuid4()}"
    items += [({}, amqp_only, json.dumps({"label": "message_id-only"}).encode(), "application/json")] * 2
    dbz = str(uuid.uuid4())
    for _ in range(2):  # a client that stamps a random message_id on every send: the header wins
        items.append(({"id": dbz}, str(uuid.uuid4()), json.dumps({"label": "header-wins"}).encode(),
                      "application/json"))
    items.append(({}, "end-" + uuid.uuid4().hex, json.dumps({"label": "end"}).encode(), "application/json"))
    _publish(rabbitmq_url, amqp_names["exchange"], items)

    _url, finish = consume("--rabbitmq", rabbitmq_url, "--queue", amqp_names["queue"])
    effects = finish()
    _one_effect_each(effects, ["ce-amqp", "ce-rabbitmq", "message_id-only", "header-wins"])
    ids = dict((label, mid) for mid, label in effects)
    assert ids["ce-amqp"] == ev_amqp.get_id() and ids["ce-rabbitmq"] == ev_rmq.get_id()
    assert ids["message_id-only"] == amqp_only and ids["header-wins"] == dbz


@pytest.mark.rabbitmq
def test_rabbitmq_id_from_nservicebus_header(consume, rabbitmq_url: str, amqp_names: dict[str, str]) -> None:
    _declare(rabbitmq_url, amqp_names)
    nsb = str(uuid.uuid4())
    items: list[tuple[dict[str, object], str | None, bytes, str | None]] = [
        # each copy also carries a different outboxkit header and message_id: the configured list replaces the default
        ({"NServiceBus.MessageId": nsb, "message-id": str(uuid.uuid4())}, str(uuid.uuid4()),
         json.dumps({"label": "nsb"}).encode(), "application/json") for _ in range(2)]
    items.append(({"message-id": "only-own"}, None, json.dumps({"label": "own-only"}).encode(), "application/json"))
    items.append(({"nservicebus.messageid": "end-" + uuid.uuid4().hex}, None, json.dumps({"label": "end"}).encode(),
                  "application/json"))
    _publish(rabbitmq_url, amqp_names["exchange"], items)

    url, finish = consume("--rabbitmq", rabbitmq_url, "--queue", amqp_names["queue"],
                          "--id-from", "header:NServiceBus.MessageId")
    effects = finish(1)
    _one_effect_each(effects, ["nsb"])
    assert dict((label, mid) for mid, label in effects)["nsb"] == nsb
    dead = _dead(url)
    assert len(dead) == 1 and "tried header:NServiceBus.MessageId)" in str(dead[0]["error"])


def test_bad_id_from_is_a_clear_cli_error(tmp_path: Path) -> None:
    for value, says in (("header:", "'header:' names no header"), ("bogus", "unknown id source 'bogus'")):
        proc = subprocess.run([sys.executable, "-m", "outbox", "consume", "x:C", "--db", "sqlite://", "--kafka",
                               "127.0.0.1:1", "--topic", "t", "--group", "g", "--id-from", value],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 2, proc.stderr
        assert f"--id-from: {says}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_id_from_from_environment_and_toml(tmp_path: Path) -> None:
    from consumers.ids import IdSource, parse_id_sources
    from outbox.cli import build_parser, consume
    from outbox.cli._settings import load_config_file, resolve

    toml = tmp_path / "consume.toml"
    toml.write_text('[consume]\nid_from = ["header:NServiceBus.MessageId", "default"]\n')
    args = build_parser().parse_args(["consume", "x:C", "--config", str(toml)])
    v = resolve(consume.settings(), args, table="consume", file=load_config_file(str(toml)), file_label=str(toml),
                environ={})
    assert parse_id_sources(v["id_from"])[:2] == (IdSource("header", "NServiceBus.MessageId"),
                                                  IdSource("header", "message-id"))
    v = resolve(consume.settings(), args, table="consume", file=load_config_file(str(toml)), file_label=str(toml),
                environ={"OUTBOX_CONSUMER_ID_FROM": "message_id,hash"})
    assert parse_id_sources(v["id_from"]) == (IdSource("message_id"), IdSource("hash"))  # env wins over the file

    base = [sys.executable, "-m", "outbox", "consume", "x:C", "--db", "sqlite://", "--kafka", "127.0.0.1:1",
            "--topic", "t", "--group", "g"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OUTBOX_CONSUMER_ID_FROM", None)
    bad = tmp_path / "bad.toml"
    bad.write_text('[consume]\nid_from = ["hash", "header:id"]\n')
    proc = subprocess.run([*base, "--config", str(bad)], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env=env)
    assert proc.returncode == 2 and f"[consume] id_from in {bad}: header:id comes after hash" in proc.stderr, \
        proc.stderr
    proc = subprocess.run(base, capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**env, "OUTBOX_CONSUMER_ID_FROM": "amqp_message_id"})
    assert proc.returncode == 2 and "environment variable OUTBOX_CONSUMER_ID_FROM: unknown id source" in proc.stderr, \
        proc.stderr
