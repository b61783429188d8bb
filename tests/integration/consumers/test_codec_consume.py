"""A consumer runner decoding with the cloudevents / debezium codec, on real RabbitMQ and SQLite.

The relay publishes a row with the codec; the message is delivered twice; the handler runs once
and sees the CloudEvents attributes (type, source, time) that the codec decoded. The id is the
AMQP ``message_id`` both codecs set, which the runner reads today (the consumer's id sources,
a separate piece of work, add the codec headers: ``ce_id``, ``cloudEvents_id``, ``id``).
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from consumers import RabbitMQRunner, declare_queue
from outbox import Outbox, default_tables
from outbox.config import RelayConfig
from outbox.relay import Relay
from outbox.transports.codecs import get_codec
from outbox.transports.rabbitmq.publisher import RabbitMQPublisher

pytestmark = [pytest.mark.rabbitmq, pytest.mark.parametrize("dialect_name", ["sqlite"], indirect=True)]
T = default_tables().outbox


@pytest.mark.parametrize("codec", ["cloudevents", "debezium"])
def test_runner_decodes_with_the_codec_and_a_redelivery_is_a_no_op(codec, engine, effects, count_effects,
                                                                   recorder_cls, helpers, rabbitmq_url, amqp_names):
    declare_queue(rabbitmq_url, amqp_names["queue"], exchange=amqp_names["exchange"])
    exchange = amqp_names["exchange"]
    with Session(engine) as s, s.begin():
        mid = Outbox().add(s, exchange, {"n": 1}, key="orders.created")
    with engine.connect() as c:
        created = c.execute(sa.select(T.c.created_at)).scalar_one()
    created = created.replace(tzinfo=dt.timezone.utc) if created.tzinfo is None else created

    # the same row published twice: what a relay retry after a lost confirm produces
    pub = RabbitMQPublisher(url=rabbitmq_url, codec=get_codec(codec, source="/shop"))
    with engine.connect() as c:
        row = c.execute(sa.select(T)).one()
    relay = Relay(engine, pub, config=RelayConfig(codec=codec, ce_source="/shop", progress_interval=0))
    try:
        assert relay.drain() == 1
        from outbox.message import OutboxRecord

        again = OutboxRecord(id=row.id, message_id=row.message_id, topic=row.topic, key=row.key, payload=row.payload,
                             content_type=row.content_type, created_at=created)
        assert [r.outcome.value for r in pub.publish([again])] == ["delivered"]
    finally:
        relay.close()

    seen: list[dict[str, str]] = []
    consumer = recorder_cls()
    original = consumer.handle

    def handle(session, message):
        seen.append(dict(message.attributes))
        return original(session, message)

    consumer.handle = handle
    runner = RabbitMQRunner(consumer, engine=engine, url=rabbitmq_url, queue=amqp_names["queue"], batch_size=1,
                            batch_timeout=0.1, codec=codec)
    with helpers.threaded(runner):
        helpers.wait(lambda: runner.stats.duplicates + runner.stats.processed >= 2, 60, "both deliveries")
    assert count_effects(str(mid)) == 1
    assert count_effects() == 1
    assert len(seen) == 1
    if codec == "cloudevents":
        attrs = seen[0]
        assert attrs["id"] == str(mid)
        assert (attrs["type"], attrs["source"]) == (exchange, "/shop")
        assert dt.datetime.fromisoformat(attrs["time"].replace("Z", "+00:00")) == created
        assert attrs["datacontenttype"] == "application/json"


@pytest.mark.kafka
@pytest.mark.parametrize("codec", ["cloudevents", "debezium"])
def test_kafka_runner_takes_the_codec_id_and_dedups_a_redelivery(codec, engine, effects, count_effects, recorder_cls,
                                                                 helpers, kafka_bootstrap):
    """No ``message-id`` header on the wire: the id comes from ``ce_id`` / Debezium's ``id``."""
    import uuid

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from consumers import KafkaRunner
    from outbox.transports.kafka.publisher import KafkaPublisher

    topic = f"codec-consume-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        fut.result(30)
    primer = str(uuid.uuid4())  # tansu can drop a partition's first record: nothing is asserted about it
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    p.produce(topic, value=b'{"n": 0}', headers={"ce_id" if codec == "cloudevents" else "id": primer.encode()})
    assert p.flush(30) == 0

    with Session(engine) as s, s.begin():
        mid = Outbox().add(s, topic, {"n": 1}, key="k")
    with engine.connect() as c:
        row = c.execute(sa.select(T)).one()
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, codec=codec)
    relay = Relay(engine, pub, config=RelayConfig(codec=codec, progress_interval=0))
    try:
        assert relay.drain() == 1
        from outbox.message import OutboxRecord

        again = OutboxRecord(id=row.id, message_id=row.message_id, topic=row.topic, key=row.key, payload=row.payload,
                             content_type=row.content_type)
        assert [r.outcome.value for r in pub.publish([again])] == ["delivered"]
    finally:
        relay.close()

    runner = KafkaRunner(recorder_cls(), engine=engine, bootstrap_servers=kafka_bootstrap, topics=[topic],
                         group_id=f"g-{uuid.uuid4().hex[:8]}", codec=codec, batch_size=1, batch_timeout=0.1,
                         config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    try:
        with helpers.threaded(runner):
            helpers.wait(lambda: count_effects(str(mid)) == 1 and runner.stats.duplicates >= 1, 60,
                         "one effect and one duplicate")
        assert count_effects(str(mid)) == 1
    finally:
        for fut in admin.delete_topics([topic]).values():
            try:
                fut.result(10)
            except Exception:
                pass
