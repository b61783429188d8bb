"""The in-repo transports' harnesses for the contract suites in :mod:`outbox.testing`.

A publisher harness owns a fresh topic (Kafka topic with 3 partitions / RabbitMQ topic exchange bound
with ``#`` to a queue), makes publishers (closed after the test) and reads back what reached the
broker with an independent client. A consumer harness adds the transport's runner and the broker's
count of unsettled messages.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outbox.brokers import MESSAGE_ID_HEADER, KafkaPublisher, MemoryPublisher, Publisher, RabbitMQPublisher
from outbox.message import OutboxRecord
from outbox.testing import ConsumerHarness, PublisherHarness, Received
from outbox.testing import record as make

#: The writer's default limit: every harness delivers payloads up to this size, and none takes
#: 1,200,000 bytes (the Kafka adapter's message.max.bytes is this plus 32,768 for headers and framing).
SIZE_LIMIT = 1_000_000


def record(topic: str, payload: bytes = b"{}", *, key: str | None = None, headers: dict[str, str] | None = None,
           content_type: str | None = None) -> OutboxRecord:
    return make(topic, payload, key=key, headers=headers, content_type=content_type)


@pytest.fixture
def make_record() -> Callable[..., OutboxRecord]:
    """``make_record(topic, payload=b"{}", key=None, headers=None, content_type=None)`` with a fresh id."""
    return record


# ------------------------------------------------------------------ memory


@pytest.fixture
def memory_harness() -> PublisherHarness:
    topic = f"mem-{uuid.uuid4().hex[:8]}"
    publishers: list[MemoryPublisher] = []

    def make(**kw: Any) -> MemoryPublisher:
        kw.setdefault("topics", {topic})
        kw.setdefault("max_payload_bytes", SIZE_LIMIT)
        pub = MemoryPublisher(**kw)
        publishers.append(pub)
        return pub

    def reader(n: int, timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            got = [
                Received(m.topic, m.key, m.payload, dict(m.headers), m.content_type, str(m.message_id))
                for p in publishers for m in p.snapshot()
            ]
            if len(got) >= n or time.monotonic() >= deadline:
                return got
            publishers[-1].wait_for(n, timeout=min(0.2, max(0.0, deadline - time.monotonic())))

    def unreachable() -> tuple[Publisher, str]:
        pub = MemoryPublisher()
        pub.unavailable = True
        return pub, "no-secret-in-memory"

    return PublisherHarness(topic, f"missing-{uuid.uuid4().hex[:8]}", make, reader, unreachable)


# ------------------------------------------------------------------ kafka


@pytest.fixture
def kafka_harness(kafka_bootstrap: str, kafka_topic: str) -> Iterator[PublisherHarness]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from outbox.devbroker import free_port

    consumer = Consumer({
        "bootstrap.servers": kafka_bootstrap,
        "group.id": f"contract-reader-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    md = consumer.list_topics(kafka_topic, timeout=10)
    parts = sorted(md.topics[kafka_topic].partitions)
    consumer.assign([TopicPartition(kafka_topic, p, OFFSET_BEGINNING) for p in parts])
    got: list[Received] = []

    def reader(n: int, timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.2):
                if msg.error():
                    continue
                headers = {k: (v or b"").decode("utf-8") for k, v in (msg.headers() or [])}
                key = msg.key()
                _kind, millis = msg.timestamp()
                got.append(Received(
                    msg.topic(), None if key is None else key.decode("utf-8"), msg.value() or b"", headers,
                    headers.get("content-type"), headers.get(MESSAGE_ID_HEADER),
                    timestamp=dt.datetime.fromtimestamp(millis / 1000, dt.timezone.utc) if millis > 0 else None,
                ))
        return list(got)

    def make(**kw: Any) -> KafkaPublisher:
        kw.setdefault("topic_metadata_timeout_ms", 1000)
        kw.setdefault("message_timeout_ms", 15000)
        return KafkaPublisher(bootstrap_servers=kafka_bootstrap, **kw)

    def unreachable() -> tuple[Publisher, str]:
        secret = "kafka-s3cret-pw"
        pub = KafkaPublisher(
            bootstrap_servers=f"127.0.0.1:{free_port()}",
            connect_timeout=2,
            config={"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                    "sasl.username": "relay", "sasl.password": secret, "log_level": 0},
        )
        return pub, secret

    yield PublisherHarness(kafka_topic, f"missing-{uuid.uuid4().hex[:8]}", make, reader, unreachable)
    consumer.close()


# ------------------------------------------------------------------ rabbitmq


@pytest.fixture
def rabbit_admin(rabbitmq_url: str) -> Iterator[Any]:
    """A plain pika BlockingChannel for setting up and inspecting exchanges and queues."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    yield ch
    if conn.is_open:
        conn.close()


@pytest.fixture
def rabbitmq_harness(rabbitmq_url: str, amqp_names: dict[str, str], rabbit_admin: Any) -> Iterator[PublisherHarness]:
    import pika

    from outbox.devbroker import free_port

    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    rabbit_admin.exchange_declare(exchange, "topic", durable=True)
    rabbit_admin.queue_declare(queue)
    rabbit_admin.queue_bind(queue, exchange, "#")
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    got: list[Received] = []
    stream = ch.consume(queue, auto_ack=True, inactivity_timeout=0.2)

    def reader(n: int, timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            method, props, body = next(stream)
            if method is None:
                continue
            headers = {str(k): v.decode() if isinstance(v, bytes) else str(v) for k, v in (props.headers or {}).items()}
            # A keyless record is published with routing key "": read it back as no key.
            stamp = None if props.timestamp is None else dt.datetime.fromtimestamp(props.timestamp, dt.timezone.utc)
            got.append(Received(method.exchange, method.routing_key or None, body, headers, props.content_type,
                                props.message_id, timestamp=stamp,
                                properties={"message_id": props.message_id, "content_type": props.content_type,
                                            "delivery_mode": props.delivery_mode}))
        return list(got)

    def make(**kw: Any) -> RabbitMQPublisher:
        kw.setdefault("max_message_bytes", SIZE_LIMIT)
        return RabbitMQPublisher(url=rabbitmq_url, **kw)

    def unreachable() -> tuple[Publisher, str]:
        secret = "rabbit-s3cret-pw"
        return RabbitMQPublisher(url=f"amqp://relay:{secret}@127.0.0.1:{free_port()}/%2F", connection_attempts=2,
                                 connect_timeout=2), secret

    missing = f"missing-{uuid.uuid4().hex[:8]}"
    yield PublisherHarness(exchange, missing, make, reader, unreachable)
    ch.cancel()
    conn.close()


# ------------------------------------------------------------------ consumer-runner harnesses

#: tansu: a short session timeout so that a crashed runner's group membership ends quickly
KAFKA_RUNNER_CONFIG = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
                       "topic.metadata.refresh.interval.ms": 1000}


@pytest.fixture
def kafka_consumer_harness(kafka_bootstrap: str, kafka_topic: str) -> ConsumerHarness:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from outbox.transports import get
    from outbox.transports.codecs import get_codec

    group = f"contract-{uuid.uuid4().hex[:8]}"
    transport = get("kafka")

    def runner(consumer: Any, engine: Any) -> Any:
        return transport.runner(consumer, engine=engine, target=kafka_bootstrap, settings=dict(KAFKA_RUNNER_CONFIG),
                                codec=get_codec("native"), topics=[kafka_topic], group_id=group, batch_size=50,
                                batch_timeout=0.2)

    def backlog(published: int) -> int:
        # tansu's end offsets are not the log's end: read every record back with a fresh reader
        # and count those at or past the group's committed offset of their partition.
        c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
        try:
            parts = [TopicPartition(kafka_topic, p) for p in range(3)]
            committed = {tp.partition: tp.offset for tp in c.committed(parts, timeout=20)}
            c.assign([TopicPartition(kafka_topic, p, OFFSET_BEGINNING) for p in range(3)])
            offsets: set[tuple[int, int]] = set()
            deadline = time.monotonic() + 30
            while len(offsets) < published and time.monotonic() < deadline:
                for m in c.consume(num_messages=500, timeout=0.2):
                    if m.error() is None:
                        offsets.add((m.partition() or 0, m.offset() or 0))
            assert len(offsets) >= published, f"read back {len(offsets)} of the {published} records published"
            return sum(1 for p, off in offsets if off >= max(committed.get(p, -1), 0))
        finally:
            c.close()

    return ConsumerHarness(
        topic=kafka_topic,
        publisher=lambda: transport.publisher(kafka_bootstrap, {}, codec=get_codec("native")),
        runner=runner,
        backlog=backlog,
    )


@pytest.fixture
def rabbitmq_consumer_harness(rabbitmq_url: str, amqp_names: dict[str, str]) -> ConsumerHarness:
    import pika

    from outbox.transports import get
    from outbox.transports.codecs import get_codec
    from outbox.transports.rabbitmq import declare_queue

    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    declare_queue(rabbitmq_url, queue, exchange=exchange)
    transport = get("rabbitmq")

    def backlog(published: int) -> int:
        conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        try:
            return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
        finally:
            conn.close()

    return ConsumerHarness(
        topic=exchange,
        publisher=lambda: transport.publisher(rabbitmq_url, {}, codec=get_codec("native")),
        runner=lambda consumer, engine: transport.runner(consumer, engine=engine, target=rabbitmq_url, settings={},
                                                         codec=get_codec("native"), queue=queue, batch_size=50,
                                                         batch_timeout=0.2),
        backlog=backlog,
    )
