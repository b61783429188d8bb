"""Messages from other clients (aio-pika, aiokafka, FastStream) through ``message_from_amqp`` /
``message_from_kafka``, processed by an AsyncDedupConsumer, on real RabbitMQ, the Kafka-protocol broker and
SQLite (aiosqlite). Each client's message must decode exactly as our own runners' (pika, confluent-kafka)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from consumers import (
    AsyncDedupConsumer,
    IncomingMessage,
    Status,
    declare_queue,
    message_from_amqp,
    message_from_kafka,
)
from outbox.message import OutboxRecord
from outbox.transports.codecs import get_codec
from tests.conftest import new_kafka_topic
from tests.integration.consumers.conftest import EFFECTS

SQLITE = pytest.mark.parametrize("dialect_name", ["sqlite"], indirect=True)
CODECS = ["native", "cloudevents"]


@pytest.fixture
async def aengine(db_url: str, engine: sa.Engine, effects: sa.Table) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(make_url(db_url).set(drivername="sqlite+aiosqlite"), connect_args={"timeout": 30})
    yield eng
    await eng.dispose()


class Orders(AsyncDedupConsumer):
    name = "test.async-clients"

    async def handle(self, session: AsyncSession, message: IncomingMessage) -> object:
        await session.execute(EFFECTS.insert().values(message_id=message.id, value=str(message.body)))
        return {"n": message.body["n"], "attrs": sorted(message.attributes)}


def record(topic: str) -> OutboxRecord:
    return OutboxRecord(id=1, message_id=uuid.uuid4(), topic=topic, key="order-7", payload=b'{"n": 7}',
                        content_type="application/json", created_at=dt.datetime.now(dt.timezone.utc),
                        attributes={"type": "order.created", "correlation_id": "c-1"})


def same_decoding(a: IncomingMessage, b: IncomingMessage) -> None:
    """What a consumer sees of a message (the delivery facts aside) is the same whichever client read it."""
    facts = ("topic", "key", "payload", "headers", "content_type", "attributes", "broker", "ordered_by_partition")
    assert {f: getattr(a, f) for f in facts} == {f: getattr(b, f) for f in facts}
    consumer = Orders()
    assert consumer.identify(a) == consumer.identify(b)


@pytest.mark.rabbitmq
@SQLITE
@pytest.mark.parametrize("codec", CODECS)
async def test_aio_pika_and_faststream_deliveries(codec, aengine, count_effects, rabbitmq_url, amqp_names):
    import aio_pika
    import pika
    from faststream.rabbit import RabbitBroker, RabbitMessage, RabbitQueue

    from outbox.transports.rabbitmq.publisher import RabbitMQPublisher

    queue, exchange = amqp_names["queue"], amqp_names["exchange"]
    declare_queue(rabbitmq_url, queue, exchange=exchange)
    rec = record(exchange)
    pub = RabbitMQPublisher(url=rabbitmq_url, codec=get_codec(codec, source="/shop"))
    try:
        for _ in range(3):  # the same row published three times: relay retries after lost confirms
            assert [r.outcome.value for r in pub.publish([rec])] == ["delivered"]
    finally:
        pub.close()

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        ch = conn.channel()
        method, props, body = ch.basic_get(queue)
        assert method is not None
        ours = message_from_amqp((method, props, body), codec=codec, queue=queue)  # what RabbitMQRunner builds
        ch.basic_nack(method.delivery_tag, requeue=True)
    finally:
        conn.close()

    consumer = Orders()
    outcomes = []
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        for _ in range(2):
            delivery = await q.get(timeout=30)
            msg = message_from_amqp(delivery, codec=codec)
            same_decoding(msg, ours)
            assert msg.raw is delivery and msg.delivery_tag == delivery.delivery_tag
            outcome = await consumer.process(aengine, msg)
            outcomes.append(outcome)
            if outcome.done:  # the ack rule: only after the database commit
                await delivery.ack()

    got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    broker = RabbitBroker(rabbitmq_url)

    @broker.subscriber(RabbitQueue(queue, declare=False))
    async def on_order(body: dict, message: RabbitMessage) -> None:  # type: ignore[type-arg]
        msg = message_from_amqp(message, codec=codec)
        same_decoding(msg, ours)
        outcome = await consumer.process(aengine, msg)
        if outcome.done and not got.done():
            got.set_result(outcome)

    async with broker:
        await broker.start()
        third = await asyncio.wait_for(got, 60)
    outcomes.append(third)

    assert [o.status for o in outcomes] == [Status.PROCESSED, Status.DUPLICATE, Status.DUPLICATE]
    assert outcomes[0].result == outcomes[1].result == outcomes[2].result  # the stored result
    assert count_effects() == 1
    if codec == "cloudevents":
        assert ours.attributes["type"] == "order.created" and ours.attributes["source"] == "/shop"


@pytest.mark.kafka
@SQLITE
@pytest.mark.parametrize("codec", CODECS)
async def test_aiokafka_and_confluent_records(codec, aengine, count_effects, kafka_bootstrap):
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from confluent_kafka import Consumer
    from confluent_kafka import TopicPartition as CTopicPartition

    from outbox.transports.kafka.publisher import KafkaPublisher

    with new_kafka_topic(kafka_bootstrap, "async-clients", partitions=1) as topic:
        pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, codec=get_codec(codec, source="/shop"))
        rec = record(topic)
        try:
            primer = OutboxRecord(id=0, message_id=uuid.uuid4(), topic=topic, key="p", payload=b'{"n": 0}')
            assert [r.outcome.value for r in pub.publish([primer])] == ["delivered"]  # tansu may drop the first
            for _ in range(2):
                assert [r.outcome.value for r in pub.publish([rec])] == ["delivered"]
        finally:
            pub.close()

        kc = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{uuid.uuid4().hex[:6]}",
                       "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        try:
            kc.assign([CTopicPartition(topic, 0, 0)])
            ours: list[IncomingMessage] = []
            while len([m for m in ours if m.key == "order-7"]) < 2:
                got = kc.consume(10, timeout=10)
                assert got, "no records from the broker"
                ours += [message_from_kafka(m, codec=codec, group_id="billing") for m in got if m.error() is None]
        finally:
            kc.close()
        ours = [m for m in ours if m.key == "order-7"]

        ak = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False,
                              auto_offset_reset="earliest")
        await ak.start()
        try:
            tp = TopicPartition(topic, 0)
            ak.assign([tp])
            await ak.seek_to_beginning(tp)
            records = []
            while len(records) < 2:
                batch = await ak.getmany(tp, timeout_ms=10_000)
                assert batch, "no records from the broker"
                records += [r for r in batch[tp] if r.key == b"order-7"]
        finally:
            await ak.stop()

    consumer = Orders()
    outcomes = []
    for r, mine in zip(records, ours, strict=True):
        msg = message_from_kafka(r, codec=codec, group_id="billing")
        same_decoding(msg, mine)
        assert (msg.partition, msg.offset, msg.consumer_group, msg.raw) == (0, r.offset, "billing", r)
        assert msg.lane == (topic, 0)
        outcomes.append(await consumer.process(aengine, msg))
    assert [o.status for o in outcomes] == [Status.PROCESSED, Status.DUPLICATE]
    assert outcomes[1].result == outcomes[0].result
    assert count_effects() == 1
