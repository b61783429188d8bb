"""One harness per broker adapter, so the same contract tests run against memory, Kafka and RabbitMQ.

A harness owns a fresh topic (Kafka topic with 3 partitions / RabbitMQ topic exchange bound with
``#`` to a queue), makes publishers (closed after the test) and reads back what reached the broker.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from outbox.brokers import MESSAGE_ID_HEADER, KafkaPublisher, MemoryPublisher, Outcome, Publisher, RabbitMQPublisher
from outbox.message import OutboxRecord

_ids = itertools.count(1)

#: The writer's default limit: every harness delivers payloads up to this size, and none takes
#: 1,200,000 bytes (the Kafka adapter's message.max.bytes is this plus 32,768 for headers and framing).
SIZE_LIMIT = 1_000_000


@dataclass
class Received:
    """A message as read back from the broker."""

    topic: str
    key: str | None
    payload: bytes
    headers: dict[str, str]
    content_type: str | None
    message_id: str | None


@dataclass
class Harness:
    kind: str
    topic: str
    missing_topic: str
    unknown_topic_marker: str
    """Text the FAILED reason of a message for a missing topic contains."""
    make: Callable[..., Publisher]
    reader: Callable[[int, float], list[Received]]
    unreachable: Callable[[], tuple[Publisher, str]]
    """A publisher aimed at a closed port, and the secret its settings carry."""
    created: list[Publisher] = field(default_factory=list)
    unknown_topic_outcome: Outcome = Outcome.FAILED
    """RETRY on Kafka (a deploy may create the topic later), FAILED where a missing target is a mistake."""

    def publisher(self, **overrides: Any) -> Publisher:
        pub = self.make(**overrides)
        self.created.append(pub)
        return pub

    def read(self, n: int, timeout: float = 30.0) -> list[Received]:
        """Wait until ``n`` messages (in total, since the start) have been read; return them all."""
        return self.reader(n, timeout)


def record(topic: str, payload: bytes = b"{}", *, key: str | None = None, headers: dict[str, str] | None = None,
           content_type: str | None = None) -> OutboxRecord:
    return OutboxRecord(id=next(_ids), message_id=uuid.uuid4(), topic=topic, key=key, payload=payload,
                        headers=dict(headers or {}), content_type=content_type)


@pytest.fixture
def make_record() -> Callable[..., OutboxRecord]:
    """``make_record(topic, payload=b"{}", key=None, headers=None, content_type=None)`` with a fresh id."""
    return record


# ------------------------------------------------------------------ memory


def _memory_harness() -> Harness:
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

    return Harness("memory", topic, f"missing-{uuid.uuid4().hex[:8]}", "UNKNOWN_TOPIC", make, reader, unreachable)


# ------------------------------------------------------------------ kafka


@pytest.fixture
def _kafka_harness(kafka_bootstrap: str, kafka_topic: str) -> Iterator[Harness]:
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
                got.append(Received(
                    msg.topic(), None if key is None else key.decode("utf-8"), msg.value() or b"", headers,
                    headers.get("content-type"), headers.get(MESSAGE_ID_HEADER),
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

    harness = Harness("kafka", kafka_topic, f"missing-{uuid.uuid4().hex[:8]}", "UNKNOWN_TOPIC", make, reader,
                      unreachable, unknown_topic_outcome=Outcome.RETRY)
    yield harness
    for pub in harness.created:
        pub.close(timeout=5)
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
def _rabbitmq_harness(rabbitmq_url: str, amqp_names: dict[str, str], rabbit_admin: Any) -> Iterator[Harness]:
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
            got.append(Received(method.exchange, method.routing_key or None, body, headers, props.content_type,
                                props.message_id))
        return list(got)

    def make(**kw: Any) -> RabbitMQPublisher:
        kw.setdefault("max_message_bytes", SIZE_LIMIT)
        return RabbitMQPublisher(url=rabbitmq_url, **kw)

    def unreachable() -> tuple[Publisher, str]:
        secret = "rabbit-s3cret-pw"
        return RabbitMQPublisher(url=f"amqp://relay:{secret}@127.0.0.1:{free_port()}/%2F", connection_attempts=2,
                                 connect_timeout=2), secret

    missing = f"missing-{uuid.uuid4().hex[:8]}"
    harness = Harness("rabbitmq", exchange, missing, "404", make, reader, unreachable)
    yield harness
    for pub in harness.created:
        pub.close(timeout=5)
    ch.cancel()
    conn.close()


# ------------------------------------------------------------------ the parametrised fixture


@pytest.fixture(params=[
    "memory",
    pytest.param("kafka", marks=pytest.mark.kafka),
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
])
def broker(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The harness of one adapter: memory, kafka (tansu) or rabbitmq."""
    if request.param == "memory":
        harness = _memory_harness()
        yield harness
        for pub in harness.created:
            pub.close()
        return
    yield request.getfixturevalue(f"_{request.param}_harness")
