"""KafkaRunner end to end on the tansu broker (PostgreSQL as the database)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from consumers import KafkaRunner, list_dead_letters

pytestmark = [pytest.mark.kafka, pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)]


def items(n: int, prefix: str = "") -> list[tuple[str | None, str, bytes]]:
    return [(str(uuid.uuid4()), f"key-{i % 7}", json.dumps({"n": i, "p": prefix}).encode()) for i in range(n)]


def test_end_to_end_poison_and_restart(engine, effects, count_effects, recorder_cls, produce, committed, helpers,
                                       kafka_bootstrap, kafka_topic, kafka_config):
    group = f"g-{uuid.uuid4().hex[:8]}"
    good = items(30)
    poison = (str(uuid.uuid4()), "key-1", b'{"n": -1}')
    produce(kafka_topic, [*good[:10], poison, *good[10:], (None, "key-2", b'{"n": -2}')])
    consumer = recorder_cls()
    consumer.failing = {poison[0]}

    def runner(c):
        return KafkaRunner(c, engine=engine, bootstrap_servers=kafka_bootstrap, topics=[kafka_topic], group_id=group,
                           config=kafka_config, batch_size=8, batch_timeout=0.2)

    with helpers.threaded(runner(consumer)) as t:
        helpers.wait(lambda: count_effects() == 30 and len(list_dead_letters(engine)) == 2, 60,
                     "30 effects and 2 dead letters")
    assert t.runner.stats.dead == 2 and t.runner.stats.retries == consumer.max_attempts - 1
    dead = {d["message_id"]: d for d in list_dead_letters(engine)}
    assert "no message id" in dead[None]["error"]
    assert dead[poison[0]]["attempts"] == consumer.max_attempts and "handler failed" in dead[poison[0]]["error"]
    assert dead[poison[0]]["source"]["broker"] == "kafka" and "offset" in dead[poison[0]]["source"]
    for msg_id, _, _ in good:
        assert count_effects(msg_id) == 1
    offsets = committed(group, kafka_topic)
    assert sum(offsets.values()) == 32  # every message, poison and id-less included, committed past

    # restarted in the same group: only the new messages arrive, nothing is redelivered
    more = items(5, "more")
    produce(kafka_topic, more)
    again = recorder_cls()
    with helpers.threaded(runner(again)) as t2:
        helpers.wait(lambda: count_effects() == 35, 60, "35 effects")
    assert sorted(again.calls) == sorted(m[0] for m in more)
    assert t2.runner.stats.duplicates == 0


CONSUMER_MODULE = textwrap.dedent('''
    import os
    import signal

    import sqlalchemy as sa
    from consumers import DedupConsumer

    CRASH = {crash!r}


    def die():
        os.kill(os.getpid(), signal.SIGKILL)


    class Writer(DedupConsumer):
        name = "test.crash"

        def handle(self, session, message):
            session.execute(sa.text("INSERT INTO test_consumer_effects (message_id, value) VALUES (:m, 'x')"),
                            {{"m": message.id}})


    class CrashingWriter(Writer):
        """The test's crash hook: SIGKILL right before / right after the first batch's DB commit."""

        def process_batch(self, engine, messages, *, before_commit=None):
            if CRASH == "before":
                return super().process_batch(engine, messages, before_commit=die)
            outcomes = super().process_batch(engine, messages, before_commit=before_commit)
            die()
            return outcomes
''')


@pytest.mark.parametrize("crash", ["after", "before"])
def test_sigkill_around_the_db_commit(crash, engine, db_url, effects, count_effects, produce, committed, helpers,
                                      kafka_bootstrap, kafka_topic, tmp_path):
    group = f"g-{uuid.uuid4().hex[:8]}"
    batch = items(20)
    produce(kafka_topic, batch)
    (tmp_path / "crashcons.py").write_text(CONSUMER_MODULE.format(crash=crash))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["--db", db_url, "--kafka", kafka_bootstrap, "--topic", kafka_topic, "--group", group, "--batch-size", "50",
            "--batch-timeout", "2", "--consumer-config", "session.timeout.ms=6000",
            "--consumer-config", "heartbeat.interval.ms=500"]
    proc = subprocess.run([sys.executable, "-m", "outbox", "consume", "crashcons:CrashingWriter", *args], env=env,
                          capture_output=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    after_crash = count_effects()
    if crash == "after":
        assert after_crash > 0  # the first batch committed in the database ...
    else:
        assert after_crash == 0  # killed before the commit: nothing happened
    assert all(o < 0 for o in committed(group, kafka_topic).values())  # ... but no offset was committed

    # restart (no crash hook): the redelivered messages are no-ops, the rest processed once
    proc = subprocess.Popen([sys.executable, "-m", "outbox", "consume", "crashcons:Writer", *args], env=env,
                            cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        helpers.wait(lambda: count_effects() == 20 and sum(committed(group, kafka_topic).values()) == 20, 90,
                     "20 effects and offsets committed")
    finally:
        proc.terminate()  # SIGTERM: finish the batch, commit, exit 0
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    for msg_id, _, _ in batch:
        assert count_effects(msg_id) == 1


def test_rebalance_mid_run(engine, effects, count_effects, recorder_cls, produce, helpers, kafka_bootstrap,
                           kafka_topic, kafka_config):
    group = f"g-{uuid.uuid4().hex[:8]}"

    def runner():
        return KafkaRunner(recorder_cls(), engine=engine, bootstrap_servers=kafka_bootstrap, topics=[kafka_topic],
                           group_id=group, config=kafka_config, batch_size=5, batch_timeout=0.1)

    sent = items(40, "a")
    produce(kafka_topic, sent)
    first = helpers.threaded(runner()).__enter__()
    try:
        helpers.wait(lambda: count_effects() >= 10, 60, "the first consumer to start")
        with helpers.threaded(runner()) as second:  # joins the group: rebalance
            more = items(40, "b")
            produce(kafka_topic, more)
            sent += more
            helpers.wait(lambda: count_effects() == 80, 90, "80 effects")
            first.stop()  # leaves the group: rebalance again
            last = items(40, "c")
            produce(kafka_topic, last)
            sent += last
            helpers.wait(lambda: count_effects() == 120, 90, "120 effects")
            assert second.runner.stats.processed > 0
    finally:
        if first.thread.is_alive():
            first.stop()
    for msg_id, _, _ in sent:
        assert count_effects(msg_id) == 1


def test_issue_repro_long_message_id_via_outbox_consume(engine, db_url, effects, count_effects, helpers,
                                                        kafka_bootstrap, kafka_topic, tmp_path):
    """Issue 10 item 1, as filed: a 300-character ``message-id`` header, then ``outbox consume``.

    It used to be dead-lettered with an INSERT the database refused, retried forever, and nothing
    behind it was processed. Now it is processed under its stable ``~h:`` form, and so is the rest.
    """
    from confluent_kafka import Producer

    from consumers.message import id_text

    group = f"g-{uuid.uuid4().hex[:8]}"
    after = items(5)
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for _ in range(2):  # the same long id twice: processed once
        p.produce(kafka_topic, b"{}", key=b"k", headers=[("message-id", b"m" * 300)])
    for msg_id, _key, payload in after:
        p.produce(kafka_topic, payload, key=b"k", headers=[("message-id", msg_id.encode())])  # type: ignore[union-attr]
    assert p.flush(30) == 0
    (tmp_path / "crashcons.py").write_text(CONSUMER_MODULE.format(crash="never"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "outbox", "consume", "crashcons:Writer", "--db", db_url, "--kafka", kafka_bootstrap,
           "--topic", kafka_topic, "--group", group, "--batch-timeout", "0.5",
           "--consumer-config", "session.timeout.ms=6000", "--consumer-config", "heartbeat.interval.ms=500"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        helpers.wait(lambda: all(count_effects(m) == 1 for m, _, _ in after), 90, "the messages behind the long id")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert count_effects(id_text(b"m" * 300)) == 1 and count_effects() == 6
    assert list_dead_letters(engine) == []
