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
