"""One trace from the writer's span to the handler's span, across the relay and a real broker.

A span is active around ``Outbox.add()``; the relay (in-process) publishes the row; a plain client
(confluent-kafka / pika) sees the W3C ``traceparent`` header on the wire; the consumer runner's
"process" span around ``handle()`` is in the writer's trace, child of and linked to the writer's span.
The relay's "send" span links to the writer's span.
The OpenTelemetry SDK's in-memory exporter records the spans; PostgreSQL is the database.
"""

from __future__ import annotations

import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from consumers import DedupConsumer, KafkaRunner, RabbitMQRunner, declare_queue
from outbox import Outbox
from outbox.config import RelayConfig
from outbox.relay import Relay

from .conftest import EFFECTS, KAFKA_TEST_CONFIG

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)

FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2,
        "progress_interval": 0, "lease_ttl": 3.0}


@pytest.fixture(scope="module")
def exporter():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exp = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    return exp


class Traced(DedupConsumer):
    name = "test.trace-e2e"

    def handle(self, session, message):
        session.execute(EFFECTS.insert().values(message_id=message.id, value=message.topic))


def write_in_a_span(engine: sa.Engine, topic: str, key: str | None) -> tuple[str, object]:
    """``add()`` inside a span named "place order"; returns the message id and the span's context."""
    from opentelemetry import trace

    with trace.get_tracer("test.writer").start_as_current_span("place order") as span:
        with Session(engine) as s, s.begin():
            mid = Outbox().add(s, topic, {"n": 1}, key=key)
    return str(mid), span.get_span_context()


def relay_drain(engine: sa.Engine, publisher) -> None:
    relay = Relay(engine, publisher, config=RelayConfig(**FAST))
    try:
        relay.drain(timeout=60)
    finally:
        relay.close()


def traceparent_of(ctx) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def process_span(exporter, destination: str, mid: str):
    spans = [s for s in exporter.get_finished_spans()
             if s.name == f"process {destination}" and s.attributes.get("messaging.message.id") == mid]
    assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
    return spans[0]


def check_continued(span, writer, system: str) -> None:
    from opentelemetry.trace import SpanKind

    assert span.kind is SpanKind.CONSUMER
    assert span.context.trace_id == writer.trace_id  # one trace: the writer's
    assert span.parent is not None and span.parent.span_id == writer.span_id
    assert [link.context.span_id for link in span.links] == [writer.span_id]
    assert span.attributes["messaging.system"] == system
    assert span.attributes["messaging.operation.type"] == "process"


def check_sent(exporter, topic: str, writer, system: str) -> None:
    """The relay's "send" span: CLIENT, linked to the writer's span (not its parent), outcome counted."""
    from opentelemetry.trace import SpanKind

    (send,) = [s for s in exporter.get_finished_spans() if s.name == f"send {topic}"]
    assert send.kind is SpanKind.CLIENT and send.parent is None
    assert [link.context.span_id for link in send.links] == [writer.span_id]
    assert (send.attributes["messaging.system"], send.attributes["messaging.operation.type"]) == (system, "send")
    assert send.attributes["outboxkit.delivered"] == 1 and send.attributes["messaging.batch.message_count"] == 1


def count(engine: sa.Engine, mid: str) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(EFFECTS).where(EFFECTS.c.message_id == mid))
                   .scalar_one())


@pytest.mark.kafka
def test_kafka_writer_span_continues_in_handle(exporter, engine, effects, helpers, kafka_bootstrap,
                                               kafka_topic) -> None:
    from confluent_kafka import Consumer

    from outbox.brokers import KafkaPublisher

    mid, writer = write_in_a_span(engine, kafka_topic, "order-1")
    relay_drain(engine, KafkaPublisher(bootstrap_servers=kafka_bootstrap))
    check_sent(exporter, kafka_topic, writer, "kafka")

    # on the wire, read by a plain client
    plain = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"plain-{uuid.uuid4().hex[:8]}",
                      "auto.offset.reset": "earliest", "enable.auto.commit": False, **KAFKA_TEST_CONFIG})
    try:
        plain.subscribe([kafka_topic])
        headers = None
        deadline = time.monotonic() + 60
        while headers is None and time.monotonic() < deadline:
            km = plain.poll(0.5)
            if km is not None and km.error() is None:
                headers = dict(km.headers() or [])
    finally:
        plain.close()
    assert headers is not None, "the plain consumer read nothing"
    assert headers["traceparent"] == traceparent_of(writer).encode()
    assert headers["message-id"] == mid.encode()

    group = f"g-{uuid.uuid4().hex[:8]}"
    runner = KafkaRunner(Traced(), engine=engine, bootstrap_servers=kafka_bootstrap, topics=[kafka_topic],
                         group_id=group, config=dict(KAFKA_TEST_CONFIG), batch_size=8, batch_timeout=0.2)
    with helpers.threaded(runner):
        helpers.wait(lambda: count(engine, mid) == 1, 60, "the handler's effect")
    span = process_span(exporter, kafka_topic, mid)
    check_continued(span, writer, "kafka")
    assert span.attributes["messaging.consumer.group.name"] == group
    assert span.attributes["messaging.destination.name"] == kafka_topic


@pytest.mark.rabbitmq
def test_rabbitmq_writer_span_continues_in_handle(exporter, engine, effects, helpers, rabbitmq_url,
                                                  amqp_names) -> None:
    import pika

    from outbox.brokers import RabbitMQPublisher

    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    peek = amqp_names["dlq"]  # a second queue on the same exchange, for the plain client
    declare_queue(rabbitmq_url, queue, exchange=exchange)
    declare_queue(rabbitmq_url, peek, exchange=exchange)

    mid, writer = write_in_a_span(engine, exchange, "orders.created")
    relay_drain(engine, RabbitMQPublisher(url=rabbitmq_url))
    check_sent(exporter, exchange, writer, "rabbitmq")

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        got = None
        deadline = time.monotonic() + 30
        while got is None and time.monotonic() < deadline:
            method, props, _body = conn.channel().basic_get(peek, auto_ack=True)
            got = props if method is not None else None
            if got is None:
                time.sleep(0.05)
    finally:
        conn.close()
    assert got is not None, "nothing reached the second queue"
    tp = got.headers["traceparent"]
    assert (tp.decode() if isinstance(tp, bytes) else tp) == traceparent_of(writer)
    assert got.message_id == mid

    runner = RabbitMQRunner(Traced(), engine=engine, url=rabbitmq_url, queue=queue, batch_size=8, batch_timeout=0.2)
    with helpers.threaded(runner):
        helpers.wait(lambda: count(engine, mid) == 1, 60, "the handler's effect")
    span = process_span(exporter, exchange, mid)
    check_continued(span, writer, "rabbitmq")
    assert span.attributes["messaging.rabbitmq.destination.routing_key"] == "orders.created"


async def test_async_handlers_run_inside_their_process_spans(exporter, engine, effects, db_url) -> None:
    """The asyncio consumer awaits a batch's handlers in one coroutine: each handler still runs with
    its own "process" span current, and a failing one marks its span failed (the batch then redoes
    with savepoints, where the message gets a span of its own again)."""
    from opentelemetry import trace
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    from consumers import AsyncDedupConsumer, IncomingMessage, Status

    seen: dict[str, list[int]] = {}
    failing = str(uuid.uuid4())

    class AsyncTraced(AsyncDedupConsumer):
        name = "test.trace-async"
        max_attempts = 1

        async def handle(self, session, message):
            seen.setdefault(message.id, []).append(trace.get_current_span().get_span_context().span_id)
            await session.execute(EFFECTS.insert().values(message_id=message.id, value=message.topic))
            if message.id == failing:
                raise RuntimeError("handler failed")

    ids = [str(uuid.uuid4()) for _ in range(3)]
    msgs = [IncomingMessage(id=i, topic="orders.async", key="k", payload=b"{}", content_type="application/json")
            for i in [*ids, failing]]
    aengine = create_async_engine(make_url(db_url).set(drivername="postgresql+psycopg"))
    try:
        out = await AsyncTraced().process(aengine, msgs[:3])
        assert [o.status for o in out] == [Status.PROCESSED] * 3
        for mid in ids:
            span = process_span(exporter, "orders.async", mid)
            assert seen[mid] == [span.context.span_id]
        bad = await AsyncTraced().process(aengine, IncomingMessage(id=failing, topic="orders.async", key="k",
                                                                   payload=b"{}", content_type="application/json"))
        assert bad.status is Status.DEAD
    finally:
        await aengine.dispose()
    spans = [s for s in exporter.get_finished_spans()
             if s.name == "process orders.async" and s.attributes.get("messaging.message.id") == failing]
    assert len(spans) == 2 and all(not s.status.is_ok for s in spans), spans  # the fast try and the savepoint try
    assert sorted(seen[failing]) == sorted(s.context.span_id for s in spans)
    assert count(engine, failing) == 0 and all(count(engine, i) == 1 for i in ids)
