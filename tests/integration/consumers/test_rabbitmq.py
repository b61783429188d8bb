"""RabbitMQRunner end to end (PostgreSQL as the database)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from consumers import RabbitMQRunner, list_dead_letters
from tests._amqp import amqp_publish, queue_depth

pytestmark = [pytest.mark.rabbitmq, pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)]


publish = amqp_publish


def items(n: int) -> list[tuple[str | None, bytes]]:
    return [(str(uuid.uuid4()), json.dumps({"n": i}).encode()) for i in range(n)]


def test_end_to_end_poison_and_reconnect(engine, effects, count_effects, recorder_cls, helpers, rabbitmq_url, queue,
                                         rabbitmq_proxy):
    good = items(30)
    poison = (str(uuid.uuid4()), b'{"n": -1}')
    consumer = recorder_cls(max_attempts=4, retry_initial=0.05, retry_max=0.2)
    consumer.failing = {poison[0]}
    publish(rabbitmq_url, queue["exchange"], [poison, *good[:15], (None, b'{"n": -2}')])
    runner = RabbitMQRunner(consumer, engine=engine, url=rabbitmq_proxy.url(rabbitmq_url), queue=queue["queue"],
                            batch_size=5, batch_timeout=0.1)
    with helpers.threaded(runner):
        helpers.wait(lambda: count_effects() == 15 and len(list_dead_letters(engine)) == 2, 60,
                     "15 effects and 2 dead letters")
        # the rejects reached the broker too (else the cut below can redeliver the poison for 4 more tries)
        helpers.wait(lambda: queue_depth(rabbitmq_url, queue["dlq"]) == 2, 30, "both dead letters in the DLQ")
        assert runner.connections == 1
        # cut the connection (our own proxy, never the shared RabbitMQ); the runner reconnects and carries on
        rabbitmq_proxy.cut_after(0)
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
    import os
    import signal

    import sqlalchemy as sa
    from consumers import DedupConsumer


    class Writer(DedupConsumer):
        name = "test.crash-rmq"

        def handle(self, session, message):
            session.execute(sa.text("INSERT INTO test_consumer_effects (message_id, value) VALUES (:m, 'x')"),
                            {"m": message.id})


    class CrashingWriter(Writer):
        """The test's crash hook: SIGKILL right after the first batch's DB commit, before any ack."""

        def process_batch(self, engine, messages, *, before_commit=None):
            outcomes = super().process_batch(engine, messages, before_commit=before_commit)
            os.kill(os.getpid(), signal.SIGKILL)
            return outcomes
''')


def test_killed_before_ack_redelivery_is_a_noop(engine, db_url, effects, count_effects, helpers, rabbitmq_url, queue,
                                                tmp_path):
    sent = items(12)
    publish(rabbitmq_url, queue["exchange"], sent)
    (tmp_path / "crashrmq.py").write_text(CONSUMER_MODULE)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--db", db_url, "--rabbitmq", rabbitmq_url, "--queue", queue["queue"], "--batch-size", "20",
            "--batch-timeout", "1"]
    proc = subprocess.run([sys.executable, "-m", "outbox", "consume", "crashrmq:CrashingWriter", *args], env=env,
                          capture_output=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert "guest:guest" not in proc.stderr.decode()  # the URL's password is masked in every line
    done = count_effects()
    assert done > 0
    helpers.wait(lambda: queue_depth(rabbitmq_url, queue["queue"]) == 12, 30, "the unacked messages back in the queue")

    proc2 = subprocess.Popen([sys.executable, "-m", "outbox", "consume", "crashrmq:Writer", *args], env=env,
                             cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        helpers.wait(lambda: count_effects() == 12 and queue_depth(rabbitmq_url, queue["queue"]) == 0, 60,
                     "12 effects and an empty queue")
    finally:
        proc2.terminate()
        _, err = proc2.communicate(timeout=60)
    assert proc2.returncode == 0, err.decode()[-2000:]
    for msg_id, _ in sent:
        assert count_effects(msg_id) == 1



def test_connection_lost_mid_batch_writes_each_dead_letter_once(engine, effects, count_effects, recorder_cls, helpers,
                                                                rabbitmq_url, queue, rabbitmq_proxy):
    """Issue 10 item 3: the batch committed (dead letters included), then the connection died before the
    acks/rejects: RabbitMQ redelivers the whole batch. The dead letters must not be written twice."""
    good = items(10)
    poison = (str(uuid.uuid4()), b'{"n": -1}')
    cuts: list[int] = []

    class CutAfterCommit(recorder_cls):  # type: ignore[misc, valid-type]
        def process_batch(self, engine, messages, *, before_commit=None):
            outcomes = super().process_batch(engine, messages, before_commit=before_commit)
            if not cuts and any(o.status.value == "dead" for o in outcomes):
                cuts.append(len(outcomes))
                rabbitmq_proxy.cut_after(0)  # committed, not yet acked/rejected
            return outcomes

    consumer = CutAfterCommit(max_attempts=1)
    consumer.failing = {poison[0]}
    publish(rabbitmq_url, queue["exchange"], [*good[:5], poison, (None, b'{"n": -2}'), *good[5:]])
    runner = RabbitMQRunner(consumer, engine=engine, url=rabbitmq_proxy.url(rabbitmq_url), queue=queue["queue"],
                            batch_size=20, batch_timeout=0.5)
    with helpers.threaded(runner):
        helpers.wait(lambda: cuts and runner.connections >= 2, 60, "the cut and a reconnect")
        helpers.wait(lambda: queue_depth(rabbitmq_url, queue["dlq"]) == 2, 60, "both dead messages rejected")
        helpers.wait(lambda: queue_depth(rabbitmq_url, queue["queue"]) == 0, 60, "an empty queue")
    assert runner.stats.dead >= 4  # each dead message was dead-lettered in both deliveries ...
    dead = list_dead_letters(engine)
    assert sorted(d["message_id"] or "" for d in dead) == sorted(["", poison[0]])  # ... but written once
    assert {d["message_id"]: d["attempts"] for d in dead}[poison[0]] == 2
    assert count_effects() == 10


def test_a_message_id_extractor_runs_once_per_delivery(engine, effects, count_effects, recorder_cls, helpers,
                                                       rabbitmq_url, queue):
    """The runner's retry bookkeeping and process_batch share one resolution of each message's id: a
    user's ``message_id`` callable (which may be costly, or count) runs once per delivery, retries
    included only as new tries of the held message, not twice per message."""
    calls: list[str] = []

    def from_body(message):
        calls.append(message.payload.decode())
        return json.loads(message.payload)["id"]

    consumer = recorder_cls(message_id=from_body)
    sent = [(None, json.dumps({"id": f"m-{i}", "n": i}).encode()) for i in range(10)]
    publish(rabbitmq_url, queue["exchange"], sent)
    runner = RabbitMQRunner(consumer, engine=engine, url=rabbitmq_url, queue=queue["queue"], batch_size=4,
                            batch_timeout=0.1)
    with helpers.threaded(runner):
        helpers.wait(lambda: count_effects() == 10, 60, "10 effects")
        helpers.wait(lambda: queue_depth(rabbitmq_url, queue["queue"]) == 0, 30, "an empty queue")
    assert sorted(calls) == sorted(body.decode() for _, body in sent), calls
