"""The relay rides out a broker restart: it backs off, reconnects and delivers what was committed."""

from __future__ import annotations

import contextlib
import subprocess

import pytest

from outbox.devbroker import DevKafkaBroker

from .conftest import create_topic, declare_queue, relay_args, wait_until, write


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def _rabbit_depth(url: str, queue: str) -> int | None:
    import pika

    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
    except Exception:
        return None
    try:
        return int(conn.channel().queue_declare(queue, passive=True, durable=True).method.message_count)
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.stops_shared_service  # under xdist: no other test runs meanwhile (their queues and connections would go)
def test_rabbitmq_stop_app_then_start_app(db, rabbitmq_url, amqp_names, rabbit_reader, start_relay):
    d = db("postgresql")
    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    declare_queue(rabbitmq_url, exchange, queue)  # durable: what was confirmed before the stop survives it
    write(d.engine, exchange, range(3000), keys=10)
    relay = start_relay(*relay_args(d.url, "--rabbitmq", rabbitmq_url, batch=100), name="rabbit")
    wait_until(lambda: (_rabbit_depth(rabbitmq_url, queue) or 0) >= 200, 60, "the first messages in the queue")

    try:
        _rabbitmqctl("stop_app")
        write(d.engine, exchange, range(3000, 4000), keys=10)
        wait_until(lambda: "broker unavailable" in relay.log() or "not delivered" in relay.log(), 60,
                   "the relay to notice that RabbitMQ is gone")
        assert relay.alive
    finally:
        _rabbitmqctl("start_app")
        wait_until(lambda: _rabbit_depth(rabbitmq_url, queue) is not None, 120, "RabbitMQ to accept connections")

    reader = rabbit_reader(rabbitmq_url, queue)
    reader.wait_seqs(set(range(4000)), timeout=180)
    wait_until(lambda: d.rows() == 0, 60, "every row to be deleted")
    assert d.dead_rows() == []
    assert relay.alive
    assert relay.stop() == 0


@pytest.mark.slow
def test_kafka_broker_replaced_on_the_same_port(db, kafka_reader, start_relay, tmp_path):
    d = db("mariadb")
    topic = "restart-topic"
    broker = DevKafkaBroker(log_path=str(tmp_path / "tansu1.log")).start()
    try:
        create_topic(broker.bootstrap_servers, topic)
        # the new broker has no topics: let the producer re-create it, whoever gets there first
        extra = ("-X", "allow.auto.create.topics=true", "-X", "reconnect.backoff.max.ms=500",
                 "-X", "message.timeout.ms=3000")  # notice the dead broker after 3 s, not 20
        relay = start_relay(*relay_args(d.url, "--kafka", broker.bootstrap_servers, batch=100, extra=extra),
                            name="kafka")
        write(d.engine, topic, range(500), keys=10)
        kafka_reader(broker.bootstrap_servers, topic).wait_seqs(set(range(500)), timeout=60)

        broker.stop()
        write(d.engine, topic, range(500, 1000), keys=10)  # committed while the broker is away
        wait_until(lambda: "broker unavailable" in relay.log() or "not delivered" in relay.log(), 60,
                   "the relay to notice that the broker is gone")
        assert relay.alive
        assert d.rows() == 500 and d.dead_rows() == [], "rows were lost or given up while the broker was away"

        broker = DevKafkaBroker(port=broker.port, log_path=str(tmp_path / "tansu2.log")).start()
        with contextlib.suppress(Exception):  # TOPIC_ALREADY_EXISTS when the relay was first
            create_topic(broker.bootstrap_servers, topic)
        wait_until(lambda: _has_topic(broker.bootstrap_servers, topic), 60, "the topic on the new broker")
        write(d.engine, topic, range(1000, 1500), keys=10)
        reader = kafka_reader(broker.bootstrap_servers, topic)
        reader.wait_seqs(set(range(500, 1500)), timeout=120)
        wait_until(lambda: d.rows() == 0, 60, "every row to be deleted")
        assert d.dead_rows() == []
        assert relay.alive
        assert relay.stop() == 0
    finally:
        broker.stop()


def _has_topic(servers: str, topic: str) -> bool:
    from .conftest import topic_exists

    return topic_exists(servers, topic)
