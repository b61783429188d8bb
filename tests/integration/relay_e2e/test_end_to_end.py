"""Committed messages reach Kafka and RabbitMQ with key, headers and payload; rolled-back ones never do.

Every dialect and every broker is exercised, with in-process relays and ``outbox relay`` subprocesses.
"""

from __future__ import annotations

import pytest

from outbox.brokers.kafka import KafkaPublisher

from .conftest import ROLLED_BACK, relay_args, wait_until, write, write_rolled_back

CASES = [
    pytest.param("sqlite", "kafka", "thread", id="sqlite-kafka-thread"),
    pytest.param("postgresql", "kafka", "thread", id="postgresql-kafka-thread"),
    pytest.param("postgresql", "rabbitmq", "cli", id="postgresql-rabbitmq-cli"),
    pytest.param("mariadb", "kafka", "cli", id="mariadb-kafka-cli"),
    pytest.param("mariadb", "rabbitmq", "thread", id="mariadb-rabbitmq-thread"),
]
N = 300


@pytest.mark.parametrize(("dialect", "broker", "mode"), CASES)
def test_committed_arrive_complete_rolled_back_never(
    dialect, broker, mode, db, request, start_relay, thread_relay, kafka_reader, rabbit_reader
):
    d = db(dialect)
    if broker == "kafka":
        servers, topic = request.getfixturevalue("kafka_bootstrap"), request.getfixturevalue("kafka_topic")
        reader = kafka_reader(servers, topic)
        target = ("--kafka", servers)
    else:
        from .conftest import declare_queue

        url, names = request.getfixturevalue("rabbitmq_url"), request.getfixturevalue("amqp_names")
        topic = names["exchange"]
        declare_queue(url, topic, names["queue"])
        reader = rabbit_reader(url, names["queue"])
        target = ("--rabbitmq", url)

    ids = write(d.engine, topic, range(N // 2), keys=7)
    if mode == "thread":
        if broker == "kafka":
            pub = KafkaPublisher(bootstrap_servers=servers)
        else:
            from outbox.brokers.rabbitmq import RabbitMQPublisher

            pub = RabbitMQPublisher(url=url)
        thread_relay(d.engine, pub)
    else:
        relay = start_relay(*relay_args(d.url, *target))
    write_rolled_back(d.engine, topic, range(1000, 1010))
    ids += write(d.engine, topic, range(N // 2, N), keys=7)
    # written after the rollback with the rolled-back messages' key: once it arrived, they would have too
    ids += write(d.engine, topic, [N], key="rb")

    got = reader.wait_seqs(set(range(N + 1)), timeout=60)
    assert not reader.seqs(marker=ROLLED_BACK), "a rolled-back message was published"
    by_id = {m.headers["message-id"]: m for m in got}
    assert set(by_id) == {str(i) for i in ids}, "message-id headers are not the outbox message ids"
    for seq, mid in enumerate(ids):
        m = by_id[str(mid)]
        expected_key = "rb" if seq == N else f"k{seq % 7}"
        assert m.topic == topic
        assert m.key == expected_key
        assert m.payload == {"seq": seq, "key": expected_key}
        assert m.headers["x-test"] == "relay-e2e"
        if broker == "rabbitmq":
            assert m.message_id == str(mid)
    # per key, in commit order
    for k in {m.key for m in got}:
        seqs = [m.seq for m in got if m.key == k]
        assert seqs == sorted(seqs), f"key {k} out of order"
    wait_until(lambda: d.rows() == 0, 30, "delivered rows to be deleted")
    if mode == "cli":
        assert relay.stop() == 0
