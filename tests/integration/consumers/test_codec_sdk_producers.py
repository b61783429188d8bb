"""Messages written by the CloudEvents SDK (not by the relay), read with ``codec="cloudevents"``.

Each event is delivered twice and has exactly one effect: the id is the CloudEvents id, whatever
binding the producer used (Kafka ``ce_`` headers; AMQP ``cloudEvents_`` application properties;
the knative RabbitMQ binding's ``ce-`` headers), with no AMQP ``message_id`` at all.
"""

from __future__ import annotations

import uuid

import pytest

from consumers import KafkaRunner, RabbitMQRunner, declare_queue

pytestmark = pytest.mark.parametrize("dialect_name", ["sqlite"], indirect=True)
ce_kafka = pytest.importorskip("cloudevents.core.bindings.kafka")
ce_amqp = pytest.importorskip("cloudevents.core.bindings.amqp")
ce_rabbitmq = pytest.importorskip("cloudevents.core.bindings.rabbitmq")


def event(event_id: str):
    from cloudevents.core.v1.event import CloudEvent

    return CloudEvent(attributes={"id": event_id, "type": "com.example.order.created", "source": "/sdk",
                                  "datacontenttype": "application/json"}, data={"n": 1})


@pytest.mark.kafka
def test_kafka_events_from_the_sdk_dedup(engine, effects, count_effects, recorder_cls, helpers, kafka_bootstrap):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"sdk-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        fut.result(30)
    ids = [f"sdk-{uuid.uuid4()}" for _ in range(3)]  # the first may be lost by tansu: counted apart
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for event_id in ids:
        msg = ce_kafka.to_binary_event(event(event_id))
        for _ in range(2):  # delivered twice
            p.produce(topic, value=msg.value, key=b"k", headers=list(msg.headers.items()))
    assert p.flush(30) == 0
    runner = KafkaRunner(recorder_cls(), engine=engine, bootstrap_servers=kafka_bootstrap, topics=[topic],
                         group_id=f"g-{uuid.uuid4().hex[:8]}", codec="cloudevents", batch_size=2, batch_timeout=0.1,
                         config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
    try:
        with helpers.threaded(runner):
            helpers.wait(lambda: count_effects(ids[-1]) == 1 and runner.stats.duplicates >= 1, 60,
                         "the last event and a duplicate")
        for event_id in ids[1:]:
            assert count_effects(event_id) == 1
        assert count_effects() <= len(ids)
    finally:
        for fut in admin.delete_topics([topic]).values():
            try:
                fut.result(10)
            except Exception:
                pass


@pytest.mark.rabbitmq
@pytest.mark.parametrize("binding", ["amqp", "rabbitmq"])
def test_amqp_events_from_the_sdk_dedup(binding, engine, effects, count_effects, recorder_cls, helpers, rabbitmq_url,
                                        amqp_names):
    import pika

    declare_queue(rabbitmq_url, amqp_names["queue"], exchange=amqp_names["exchange"])
    ids = [f"sdk-{uuid.uuid4()}" for _ in range(2)]
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for event_id in ids:
        if binding == "amqp":  # the CloudEvents AMQP binding: cloudEvents_ application properties
            m = ce_amqp.to_binary_event(event(event_id))
            headers, ctype, body = dict(m.application_properties), m.properties["content-type"], m.application_data
        else:  # the knative RabbitMQ binding: ce- headers
            q = ce_rabbitmq.to_binary_event(event(event_id))
            headers, ctype, body = dict(q.headers), q.content_type, q.body
        for _ in range(2):
            ch.basic_publish(amqp_names["exchange"], "orders.created", body,
                             pika.BasicProperties(headers=headers, content_type=ctype, delivery_mode=2))
    conn.close()
    runner = RabbitMQRunner(recorder_cls(), engine=engine, url=rabbitmq_url, queue=amqp_names["queue"],
                            codec="cloudevents", batch_size=1, batch_timeout=0.1)
    with helpers.threaded(runner):
        helpers.wait(lambda: runner.stats.processed + runner.stats.duplicates >= 4, 60, "four deliveries")
    assert [count_effects(i) for i in ids] == [1, 1]
    assert count_effects() == 2
