"""Messages the broker refuses end dead with its reason while the others flow; a requeue sends them once."""

from __future__ import annotations

import uuid

import pytest

from outbox.brokers.kafka import KafkaPublisher

from .conftest import cli_json, declare_queue, relay_args, run_cli, topic_exists, wait_until, write

SENTINEL = 1_000_000


def _one_dead(d, key: str) -> list:
    rows = d.dead_rows()
    return rows if len(rows) == 1 and rows[0].key == key else []


def _requeue_and_check_once(d, reader, topic: str, key: str, seq: int) -> None:
    """``outbox dead requeue --id N``; the message arrives, and once only (a later message of its key proves it)."""
    row_id = d.dead_rows()[0].id
    done = run_cli("dead", "requeue", "--db", d.url, "--id", str(row_id))
    assert done.returncode == 0, done.stderr
    assert "requeued 1 message" in done.stdout
    reader.wait_seqs({seq}, timeout=60)
    write(d.engine, topic, [SENTINEL], key=key)  # same key: arrives after any resend of the requeued one
    reader.wait_seqs({SENTINEL}, timeout=60)
    assert [m.seq for m in reader.got if m.key == key] == [seq, SENTINEL]
    assert cli_json("status", "--db", d.url)["dead"] == 0


def test_kafka_oversized_message_dead_others_flow_then_requeue(db, kafka_bootstrap, kafka_topic, kafka_reader,
                                                               start_relay):
    d = db("postgresql")
    reader = kafka_reader(kafka_bootstrap, kafka_topic)
    write(d.engine, kafka_topic, range(100), keys=5)
    write(d.engine, kafka_topic, [500], key="big", extra={"pad": "x" * 30_000})
    write(d.engine, kafka_topic, range(100, 200), keys=5)
    broker = ("--kafka", kafka_bootstrap)
    r1 = start_relay(*relay_args(d.url, *broker, extra=("-X", "message.max.bytes=10000")), name="small-limit")

    reader.wait_seqs(set(range(200)), timeout=60)
    wait_until(lambda: _one_dead(d, "big"), 30, "the oversized message to be marked dead")
    listed = cli_json("dead", "list", "--db", d.url)
    assert [r["key"] for r in listed] == ["big"]
    assert "MSG_SIZE_TOO_LARGE" in listed[0]["last_error"]
    assert cli_json("status", "--db", d.url)["dead"] == 1
    assert 500 not in reader.seqs()
    assert r1.stop() == 0

    start_relay(*relay_args(d.url, *broker), name="default-limit")  # message.max.bytes back to 1,000,000
    _requeue_and_check_once(d, reader, kafka_topic, "big", 500)


def test_kafka_unknown_topic_dead_after_max_attempts_when_auto_create_is_off(db, kafka_bootstrap, kafka_topic,
                                                                             kafka_reader, thread_relay):
    d = db("sqlite")
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    reader = kafka_reader(kafka_bootstrap, kafka_topic)
    write(d.engine, kafka_topic, range(50), keys=5)
    write(d.engine, missing, [500], key="lost")
    write(d.engine, kafka_topic, range(50, 100), keys=5)
    pub = KafkaPublisher(bootstrap_servers=kafka_bootstrap, auto_create_topics=False, topic_metadata_timeout_ms=1000)
    thread_relay(d.engine, pub, max_attempts=3, backoff_initial=0.2, backoff_max=0.5)

    reader.wait_seqs(set(range(100)), timeout=60)
    wait_until(lambda: d.dead_rows() or d.rows() == 0, 60, "the message for the missing topic to be settled")
    if topic_exists(kafka_bootstrap, missing):
        pytest.skip("this Kafka broker creates topics on produce although the producer sets "
                    "allow.auto.create.topics=false, so an unknown topic cannot fail")
    rows = _one_dead(d, "lost")
    assert rows, f"expected one dead row for key 'lost', got {d.dead_rows()}"
    assert "UNKNOWN_TOPIC" in rows[0].last_error
    assert "gave up after 3 attempts" in rows[0].last_error  # retried first: the topic may appear later


def test_rabbitmq_unroutable_message_dead_others_flow_then_requeue(db, rabbitmq_url, amqp_names, rabbit_reader,
                                                                   start_relay):
    import pika

    d = db("mariadb")
    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    declare_queue(rabbitmq_url, exchange, queue, binding="ok.#")  # nothing routes "lost.*"
    reader = rabbit_reader(rabbitmq_url, queue)
    for i in range(0, 60, 20):
        write(d.engine, exchange, range(i, i + 20), key=f"ok.{i}")
    write(d.engine, exchange, [500], key="lost.1")
    write(d.engine, exchange, range(60, 100), key="ok.x")
    start_relay(*relay_args(d.url, "--rabbitmq", rabbitmq_url), name="rabbit")

    reader.wait_seqs(set(range(100)), timeout=60)
    wait_until(lambda: _one_dead(d, "lost.1"), 30, "the unroutable message to be marked dead")
    listed = cli_json("dead", "list", "--db", d.url)
    assert [r["key"] for r in listed] == ["lost.1"]
    reason = listed[0]["last_error"]
    assert "NO_ROUTE" in reason and f"exchange={exchange!r}, routing_key='lost.1'" in reason, reason
    # says what to do, and nothing of the broker URL's credentials
    assert "bind a queue to the exchange with a matching routing key" in reason and "alternate exchange" in reason
    assert "guest" not in reason and "amqp://" not in reason
    text = run_cli("status", "--db", d.url)
    assert text.returncode == 0, text.stderr
    dead_line = [line.split() for line in text.stdout.splitlines() if line.startswith("dead:")]
    assert dead_line and dead_line[0][:2] == ["dead:", "1"], text.stdout

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        conn.channel().queue_bind(queue, exchange, "lost.#")
    finally:
        conn.close()
    _requeue_and_check_once(d, reader, exchange, "lost.1", 500)
