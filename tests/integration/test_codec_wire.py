"""Each codec on the real brokers: a message written by ``Outbox.add`` and relayed is read by clients
this project did not write.

Kafka: a plain confluent-kafka Consumer reads the record (key, value, headers, CreateTime); for the
``cloudevents`` codec the CloudEvents SDK (``cloudevents.core.bindings.kafka.from_binary_event``
and the older ``cloudevents.v1.kafka.from_binary``) parses it. RabbitMQ: plain pika reads the
message (properties, headers, body); for ``cloudevents`` the SDK's AMQP binding
(``cloudevents.core.bindings.amqp.from_binary_event``, which reads ``cloudEvents_`` application
properties, here the AMQP 0-9-1 headers table) parses it. Every reader sees the id ``add()``
returned, the type, source, time (the row's ``created_at``) and the data.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, default_tables
from outbox.config import RelayConfig
from outbox.relay import Relay
from outbox.transports.codecs import get_codec
from tests.conftest import new_kafka_topic

T = default_tables().outbox
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2,
        "progress_interval": 0, "lease_ttl": 3.0}
CODECS = ["native", "cloudevents", "debezium"]
SOURCE = "/shop/orders-service"
PAYLOAD = {"order": 17, "total": "12.50"}
#: add() takes type/source/subject once the writer has them (the writer-attrs work); until then the
#: row carries none, and the codec's defaults (type = topic, source = the relay's ce_source) apply.
ADD_TAKES_ATTRIBUTES = "type" in inspect.signature(Outbox.add).parameters


def _rfc3339(stamp: dt.datetime) -> str:
    return stamp.astimezone(dt.timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def write(engine: sa.Engine, topic: str, *, attributes: dict[str, str] | None = None) -> tuple[uuid.UUID,
                                                                                                dt.datetime]:
    """One message through the writer; its id and the created_at stored with it."""
    with Session(engine) as s, s.begin():
        mid = Outbox().add(s, topic, PAYLOAD, key="order-17", headers={"tenant": "t1"}, **(attributes or {}))
    with engine.connect() as c:
        created = c.execute(sa.select(T.c.created_at).where(T.c.message_id == mid)).scalar_one()
    return mid, created.replace(tzinfo=dt.timezone.utc) if created.tzinfo is None else created


def relay_once(engine: sa.Engine, publisher, codec: str) -> None:
    relay = Relay(engine, publisher, config=RelayConfig(codec=codec, ce_source=SOURCE, **FAST))
    try:
        assert relay.drain() == 1
    finally:
        relay.close()


def expected(topic: str, attributes: dict[str, str] | None) -> tuple[str, str]:
    attributes = attributes or {}
    return attributes.get("type", topic), attributes.get("source", SOURCE)


# ------------------------------------------------------------------ Kafka


@pytest.fixture
def one_partition_topic(kafka_bootstrap):
    """A one-partition topic primed with a record of its own: tansu can drop a partition's first record."""
    from confluent_kafka import Producer

    with new_kafka_topic(kafka_bootstrap, "codec") as name:
        p = Producer({"bootstrap.servers": kafka_bootstrap})
        p.produce(name, value=b"primer", headers={"primer": b"1"})
        assert p.flush(30) == 0
        yield name


def read_kafka(bootstrap: str, topic: str, timeout: float = 30.0):
    """The first record after the primer, read by a fresh plain consumer."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "session.timeout.ms": 6000})
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in c.consume(num_messages=10, timeout=0.5):
                if m.error() is None and dict(m.headers() or []).get("primer") is None:
                    return m
        raise AssertionError(f"nothing relayed reached {topic} within {timeout} s")
    finally:
        c.close()


def _kafka_attributes() -> list:
    cases = [pytest.param(None, id="defaults")]
    cases.append(pytest.param({"type": "com.example.order.created", "source": "/shop", "subject": "order-17"},
                              id="from-add",
                              marks=pytest.mark.skipif(not ADD_TAKES_ATTRIBUTES,
                                                       reason="Outbox.add() takes no type/source yet")))
    return cases


@pytest.mark.kafka
@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("attributes", _kafka_attributes())
@pytest.mark.parametrize("codec", CODECS)
def test_kafka_record_read_by_other_clients(codec, attributes, engine, kafka_bootstrap, one_partition_topic):
    from confluent_kafka import TIMESTAMP_CREATE_TIME

    from outbox.transports.kafka.publisher import KafkaPublisher

    topic = one_partition_topic
    mid, created = write(engine, topic, attributes=attributes)
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, codec=get_codec(codec, source=SOURCE))
    relay_once(engine, pub, codec)
    m = read_kafka(kafka_bootstrap, topic)

    assert json.loads(m.value()) == PAYLOAD
    assert m.key() == b"order-17"
    assert m.timestamp() == (TIMESTAMP_CREATE_TIME, int(created.timestamp() * 1000))
    headers = {k: v.decode() for k, v in m.headers()}
    assert headers["tenant"] == "t1"
    ce_type, ce_source = expected(topic, attributes)
    if codec == "native":
        assert headers["message-id"] == str(mid)
        assert headers["content-type"] == "application/json"
        if attributes:
            assert headers["message-type"] == attributes["type"]
    elif codec == "debezium":
        assert headers["id"] == str(mid)
        assert "message-id" not in headers
    else:
        assert "message-id" not in headers
        assert headers["ce_specversion"] == "1.0"
        assert headers["ce_id"] == str(mid)
        assert (headers["ce_type"], headers["ce_source"]) == (ce_type, ce_source)
        assert headers["ce_time"] == _rfc3339(created)
        assert headers["content-type"] == "application/json"

        from cloudevents.core.bindings import kafka as ce_kafka
        from cloudevents.v1 import kafka as ce_v1_kafka

        msg = ce_kafka.KafkaMessage(headers=dict(m.headers()), key=m.key(), value=m.value())
        events = [ce_kafka.from_binary_event(msg) for _ in range(2)]
        for ev in events:
            assert ev.get_id() == str(mid)  # the same id on every parse: nothing invented
            assert (ev.get_type(), ev.get_source()) == (ce_type, ce_source)
            assert ev.get_time() == created
            assert ev.get_data() == PAYLOAD
        if attributes and "subject" in attributes:
            assert events[0].get_subject() == attributes["subject"]
        legacy = ce_v1_kafka.KafkaMessage(headers=dict(m.headers()), key=m.key(), value=m.value())
        assert {ce_v1_kafka.from_binary(legacy)["id"] for _ in range(2)} == {str(mid)}


# ------------------------------------------------------------------ RabbitMQ


@pytest.fixture
def routed(amqp_names, rabbitmq_url):
    """A topic exchange bound with '#' to a queue: (exchange, queue)."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    ch.exchange_declare(amqp_names["exchange"], "topic", durable=True)
    ch.queue_declare(amqp_names["queue"])
    ch.queue_bind(amqp_names["queue"], amqp_names["exchange"], "#")
    conn.close()
    return amqp_names["exchange"], amqp_names["queue"]


def read_amqp(url: str, queue: str, timeout: float = 30.0):
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is not None:
                return method, props, body
            time.sleep(0.05)  # basic_get polls: nothing to await on a plain channel
        raise AssertionError(f"nothing relayed reached queue {queue} within {timeout} s")
    finally:
        conn.close()


@pytest.mark.rabbitmq
@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("attributes", _kafka_attributes())
@pytest.mark.parametrize("codec", CODECS)
def test_rabbitmq_message_read_by_other_clients(codec, attributes, engine, rabbitmq_url, routed):
    from outbox.transports.rabbitmq.publisher import RabbitMQPublisher

    exchange, queue = routed
    mid, created = write(engine, exchange, attributes=attributes)
    pub = RabbitMQPublisher(url=rabbitmq_url, codec=get_codec(codec, source=SOURCE))
    relay_once(engine, pub, codec)
    method, props, body = read_amqp(rabbitmq_url, queue)

    assert json.loads(body) == PAYLOAD
    assert method.routing_key == "order-17"
    assert props.timestamp == int(created.timestamp())  # AMQP timestamps are whole seconds
    assert props.message_id == str(mid)
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in (props.headers or {}).items()}
    assert headers["tenant"] == "t1"
    ce_type, ce_source = expected(exchange, attributes)
    if codec == "native":
        assert headers["message-id"] == str(mid)
        if attributes:
            assert props.type == attributes["type"]
    elif codec == "debezium":
        assert headers["id"] == str(mid)
    else:
        assert headers["cloudEvents_specversion"] == "1.0"
        assert headers["cloudEvents_id"] == str(mid)
        assert (headers["cloudEvents_type"], headers["cloudEvents_source"]) == (ce_type, ce_source)
        assert headers["cloudEvents_time"] == _rfc3339(created)
        assert props.type == ce_type

        from cloudevents.core.bindings import amqp as ce_amqp

        msg = ce_amqp.AMQPMessage(properties={"content-type": props.content_type}, application_properties=headers,
                                  application_data=body)
        events = [ce_amqp.from_binary_event(msg) for _ in range(2)]
        for ev in events:
            assert ev.get_id() == str(mid)
            assert (ev.get_type(), ev.get_source()) == (ce_type, ce_source)
            assert ev.get_time() == created
            assert ev.get_data() == PAYLOAD
