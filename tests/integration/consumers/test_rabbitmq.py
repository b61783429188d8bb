"""RabbitMQRunner end to end (PostgreSQL as the database)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pika
import pytest

from consumers import RabbitMQRunner, declare_queue, list_dead_letters

pytestmark = [pytest.mark.rabbitmq, pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)]


@pytest.fixture
def queue(rabbitmq_url, amqp_names):
    declare_queue(rabbitmq_url, amqp_names["queue"], exchange=amqp_names["exchange"],
                  dead_letter_exchange=amqp_names["dlx"], dead_letter_queue=amqp_names["dlq"])
    return amqp_names


def publish(url: str, exchange: str, items: list[tuple[str | None, bytes]]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    for msg_id, body in items:
        ch.basic_publish(exchange, "orders.created", body,
                         pika.BasicProperties(message_id=msg_id, content_type="application/json", delivery_mode=2))
    conn.close()


def queue_depth(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def items(n: int) -> list[tuple[str | None, bytes]]:
    return [(str(uuid.uuid4()), json.dumps({"n": i}).encode()) for i in range(n)]


def test_end_to_end_poison_and_reconnect(engine, effects, count_effects, recorder_cls, helpers, rabbitmq_url, queue):
    good = items(30)
    poison = (str(uuid.uuid4()), b'{"n": -1}')
    consumer = recorder_cls(max_attempts=4, retry_initial=0.05, retry_max=0.2)
    consumer.failing = {poison[0]}
    publish(rabbitmq_url, queue["exchange"], [poison, *good[:15], (None, b'{"n": -2}')])
    runner = RabbitMQRunner(consumer, engine=engine, url=rabbitmq_url, queue=queue["queue"], batch_size=5,
                            batch_timeout=0.1)
    with helpers.threaded(runner):
        helpers.wait(lambda: count_effects() == 15 and len(list_dead_letters(engine)) == 2, 60,
                     "15 effects and 2 dead letters")
        assert runner.connections == 1
        # close every connection from the server side; the runner reconnects and carries on
        subprocess.run(["rabbitmqctl", "close_all_connections", "test: reconnect"], check=True, capture_output=True,
                       timeout=60)
        helpers.wait(lambda: runner.connections >= 2, 60, "a reconnect")
        publish(rabbitmq_url, queue["exchange"], good[15:])
        helpers.wait(lambda: count_effects() == 30, 60, "30 effects")
        helpers.wait(lambda: queue_depth(rabbitmq_url, queue["queue"]) == 0, 30, "an empty queue")
    for msg_id, _ in good:
        assert count_effects(msg_id) == 1
    dead = {d["message_id"]: d for d in list_dead_letters(engine)}
    assert dead[poison[0]]["attempts"] == 4 and "no message id" in dead[None]["error"]
    assert dead[poison[0]]["source"]["broker"] == "rabbitmq"
    helpers.wait(lambda: queue_depth(rabbitmq_url, queue["dlq"]) == 2, 30, "both dead letters in the DLQ")


CONSUMER_MODULE = textwrap.dedent('''
    import sqlalchemy as sa
    from consumers import DedupConsumer

    class Writer(DedupConsumer):
        name = "test.crash-rmq"

        def handle(self, session, message):
            session.execute(sa.text("INSERT INTO test_consumer_effects (message_id, value) VALUES (:m, 'x')"),
                            {"m": message.id})
''')


def test_killed_before_ack_redelivery_is_a_noop(engine, db_url, effects, count_effects, helpers, rabbitmq_url, queue,
                                                tmp_path):
    sent = items(12)
    publish(rabbitmq_url, queue["exchange"], sent)
    (tmp_path / "crashrmq.py").write_text(CONSUMER_MODULE)
    env = {**os.environ, "OUTBOX_TEST_CRASH_AFTER_DB_COMMIT": "1",
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "outbox", "consume", "crashrmq:Writer", "--db", db_url, "--rabbitmq", rabbitmq_url,
           "--queue", queue["queue"], "--batch-size", "20", "--batch-timeout", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert "guest:guest" not in proc.stderr.decode()  # the URL's password is masked in every line
    done = count_effects()
    assert done > 0
    helpers.wait(lambda: queue_depth(rabbitmq_url, queue["queue"]) == 12, 30, "the unacked messages back in the queue")

    env.pop("OUTBOX_TEST_CRASH_AFTER_DB_COMMIT")
    proc2 = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        helpers.wait(lambda: count_effects() == 12 and queue_depth(rabbitmq_url, queue["queue"]) == 0, 60,
                     "12 effects and an empty queue")
    finally:
        proc2.terminate()
        _, err = proc2.communicate(timeout=60)
    assert proc2.returncode == 0, err.decode()[-2000:]
    for msg_id, _ in sent:
        assert count_effects(msg_id) == 1
