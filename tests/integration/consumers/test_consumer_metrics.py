"""Consumer metrics and probes (issue 12 part 1) on the real brokers, PostgreSQL as the database."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import pika
import pytest

from consumers import KafkaRunner, RabbitMQRunner, declare_queue

prometheus = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from outbox.observability.serve import serve_consumer  # noqa: E402

pytestmark = [pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def outcomes(text: str, consumer: str) -> dict[str, float | None]:
    return {o: sample(text, "outbox_consumer_messages_total", consumer=consumer, outcome=o)
            for o in ("processed", "duplicate", "retry", "dead")}


@pytest.mark.rabbitmq
def test_rabbitmq_consumer_counts_outcomes_and_queue_depth(engine, effects, recorder_cls, helpers, rabbitmq_url,
                                                           amqp_names):
    declare_queue(rabbitmq_url, amqp_names["queue"], exchange=amqp_names["exchange"],
                  dead_letter_exchange=amqp_names["dlx"], dead_letter_queue=amqp_names["dlq"])
    ids = [str(uuid.uuid4()) for _ in range(20)]
    poison = str(uuid.uuid4())
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for mid in [*ids, poison, *ids[:5]]:  # the first five twice: duplicates
        ch.basic_publish(amqp_names["exchange"], "k", json.dumps({"n": 1}).encode(),
                         pika.BasicProperties(message_id=mid, content_type="application/json", delivery_mode=2))
    conn.close()
    consumer = recorder_cls(max_attempts=2)
    consumer.failing = {poison}
    runner = RabbitMQRunner(consumer, engine=engine, url=rabbitmq_url, queue=amqp_names["queue"], batch_size=5,
                            batch_timeout=0.1)
    stop = serve_consumer(runner, engine, "127.0.0.1:0", interval=0.2)
    port = runner.metrics_server.port
    try:
        assert sample(scrape(port)[1], "outbox_consumer_queue_depth_messages", consumer=consumer.name,
                      queue=amqp_names["queue"]) is None  # not read before the runner connects
        with helpers.threaded(runner):
            def done() -> bool:
                text = scrape(port)[1]
                o = outcomes(text, consumer.name)
                return (o["processed"] == 20 and o["duplicate"] == 5 and o["dead"] == 1
                        and sample(text, "outbox_consumer_queue_depth_messages", consumer=consumer.name,
                                   queue=amqp_names["queue"]) == 0)

            helpers.wait(done, 60, "20 processed, 5 duplicates, 1 dead and an empty queue in /metrics")
            text = scrape(port)[1]
            assert outcomes(text, consumer.name)["retry"] >= 1
            # 20 handled, the poison twice; duplicates never reach handle()
            assert sample(text, "outbox_consumer_handler_duration_seconds_count", consumer=consumer.name) >= 22
            assert sample(text, "outbox_consumer_batch_size_count", consumer=consumer.name) >= 5
            assert sample(text, "outbox_consumer_last_loop_timestamp_seconds", consumer=consumer.name) > 0
            helpers.wait(lambda: scrape(port, "/readyz")[0] == 200, 30, "/readyz 200")
            assert scrape(port, "/healthz")[0] == 200
    finally:
        stop()


@pytest.mark.kafka
def test_kafka_consumer_lag_falls_to_zero(engine, effects, recorder_cls, produce, helpers, kafka_bootstrap,
                                          kafka_topic, kafka_config):
    items = [(str(uuid.uuid4()), f"key-{i % 3}", json.dumps({"n": i}).encode()) for i in range(30)]
    produce(kafka_topic, items)

    class Slow(recorder_cls):  # slow enough that the lag is seen above 0 before it reaches 0
        def handle(self, session, message):
            time.sleep(0.03)
            return super().handle(session, message)

    consumer = Slow()
    runner = KafkaRunner(consumer, engine=engine, bootstrap_servers=kafka_bootstrap, topics=[kafka_topic],
                         group_id=f"g-{uuid.uuid4().hex[:8]}", config=kafka_config, batch_size=8, batch_timeout=0.2)
    stop = serve_consumer(runner, engine, "127.0.0.1:0", interval=0.2)
    port = runner.metrics_server.port
    try:
        with helpers.threaded(runner):
            seen: list[float] = []

            def caught_up() -> bool:
                text = scrape(port)[1]
                lags = [sample(text, "outbox_consumer_lag_messages", consumer=consumer.name, topic=kafka_topic,
                               partition=str(p)) for p in range(3)]
                seen.extend(v for v in lags if v is not None)
                return outcomes(text, consumer.name)["processed"] == 30 and lags == [0, 0, 0]

            helpers.wait(caught_up, 90, "30 processed and a lag of 0 on all 3 partitions")
            assert max(seen) > 0, "the lag was never seen above 0"
            helpers.wait(lambda: scrape(port, "/readyz")[0] == 200, 30, "/readyz 200")
    finally:
        stop()


CLI_MODULE = '''
import sqlalchemy as sa
from consumers import DedupConsumer


class Writer(DedupConsumer):
    name = "test.cli-metrics"

    def handle(self, session, message):
        session.execute(sa.text("INSERT INTO test_consumer_effects (message_id, value) VALUES (:m, 'x')"),
                        {"m": message.id})
'''


@pytest.mark.rabbitmq
def test_outbox_consume_serves_metrics_with_http(engine, db_url, effects, count_effects, helpers, rabbitmq_url,
                                                 amqp_names, tmp_path):
    import os
    import subprocess
    import sys

    from outbox.devbroker import free_port

    declare_queue(rabbitmq_url, amqp_names["queue"], exchange=amqp_names["exchange"])
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    ch.confirm_delivery()
    for _ in range(12):
        ch.basic_publish(amqp_names["exchange"], "k", b'{"n": 1}',
                         pika.BasicProperties(message_id=str(uuid.uuid4()), content_type="application/json"))
    conn.close()
    (tmp_path / "climetrics.py").write_text(CLI_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "outbox", "consume", "climetrics:Writer", "--db", db_url,
                             "--rabbitmq", rabbitmq_url, "--queue", amqp_names["queue"], "--batch-timeout", "0.2",
                             "--http", f"127.0.0.1:{port}", "--metrics-interval", "0.5"],
                            env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        def done() -> bool:
            try:
                text = scrape(port)[1]
            except OSError:
                return False
            return (outcomes(text, "test.cli-metrics")["processed"] == 12
                    and sample(text, "outbox_consumer_queue_depth_messages", consumer="test.cli-metrics",
                               queue=amqp_names["queue"]) == 0)

        helpers.wait(done, 60, "12 processed and an empty queue in /metrics of `outbox consume --http`")
        helpers.wait(lambda: scrape(port, "/readyz")[0] == 200, 30, "/readyz 200")
        assert count_effects() == 12
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "guest:guest" not in err.decode()
