"""Issue 13's held-out runs for the asyncio consumer, through ``outbox consume`` with an async class.

5,000 messages; the consumer process is SIGKILLed right after a batch's database commit and before
its offsets are committed (Kafka) or its deliveries acked (RabbitMQ); a restarted consumer drains the
rest, and then the same 5,000 are delivered once more. Exactly 5,000 effects, one per message id, on
PostgreSQL (async psycopg) and SQLite (aiosqlite). The crash hook lives in the test's own consumer
module, as in the sync test (tests/integration/consumers/test_kafka.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests._amqp import amqp_publish, queue_depth

N = 5_000
BATCH = 250
CRASH_AFTER_BATCHES = 3  # killed after the 3rd batch's DB commit: 2 batches acked, the 3rd committed but not acked

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql", "sqlite"], indirect=True)

CONSUMER_MODULE = textwrap.dedent('''
    import os
    import signal

    import sqlalchemy as sa
    from consumers import AsyncDedupConsumer


    class Writer(AsyncDedupConsumer):
        name = "test.async-held-out"

        async def handle(self, session, message):
            await session.execute(sa.text("INSERT INTO test_consumer_effects (message_id, value) VALUES (:m, 'x')"),
                                  {{"m": message.id}})
            return {{"n": message.body["n"]}}


    class CrashingWriter(Writer):
        """The test's crash hook: SIGKILL right after batch {crash_after}'s DB commit, before its offsets/acks."""

        batches = 0

        async def process_batch(self, engine, messages, *, before_commit=None):
            outcomes = await super().process_batch(engine, messages, before_commit=before_commit)
            CrashingWriter.batches += 1
            if CrashingWriter.batches == {crash_after}:
                os.kill(os.getpid(), signal.SIGKILL)
            return outcomes
''')


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "heldout.py").write_text(CONSUMER_MODULE.format(crash_after=CRASH_AFTER_BATCHES))
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _consume(target: str, args: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    return [sys.executable, "-m", "outbox", "consume", f"heldout:{target}", *args]


def _final_stats(stderr: str) -> dict[str, int]:
    """The runner's last line: ``stopped (processed P, duplicates D, retries R, dead X, batches B)``."""
    found = re.findall(r"stopped \(processed (\d+), duplicates (\d+), retries (\d+), dead (\d+)", stderr)
    assert found, stderr[-3000:]
    p, d, r, x = (int(v) for v in found[-1])
    return {"processed": p, "duplicates": d, "retries": r, "dead": x}


def _crash_run(cmd: list[str], env: dict[str, str], cwd: Path, count_effects) -> int:
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=180, cwd=cwd)
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]  # killed by its own hook
    done = count_effects()
    # the crashed batch committed in the database (more than the batches before it acked) ...
    assert done >= CRASH_AFTER_BATCHES and done <= CRASH_AFTER_BATCHES * BATCH, done
    return done


def _restart_until(cmd: list[str], env: dict[str, str], cwd: Path, condition, redeliver, helpers) -> dict[str, int]:
    """Run the consumer without the hook until ``condition()``; ``redeliver()`` once the first drain is done;
    SIGTERM; the runner's final stats."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stderr=subprocess.PIPE)
    try:
        helpers.wait(condition[0], 120, "the rest drained")
        redeliver()
        helpers.wait(condition[1], 120, "the redelivery drained")
    finally:
        proc.terminate()  # SIGTERM: finish the batch in hand, commit, exit 0
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    return _final_stats(err.decode())


def _check_exactly_once(engine, sent_ids: list[str], also: list[str] = []) -> None:  # noqa: B006
    import sqlalchemy as sa

    from .conftest import EFFECTS

    with engine.connect() as c:
        rows = c.execute(sa.select(EFFECTS.c.message_id, sa.func.count()).group_by(EFFECTS.c.message_id)).all()
    per_id = dict(rows)
    assert len(per_id) == N + len(also) and set(per_id) == {*sent_ids, *also}
    assert {n for n in per_id.values()} == {1}, {k: v for k, v in per_id.items() if v != 1}


@pytest.mark.kafka
def test_kafka_5000_twice_sigkill_after_the_db_commit(engine, db_url, effects, count_effects, produce, committed,
                                                      helpers, kafka_bootstrap, kafka_topic, tmp_path):
    group = f"g-{uuid.uuid4().hex[:8]}"
    sent = [(str(uuid.uuid4()), f"key-{i % 13}", json.dumps({"n": i}).encode()) for i in range(N)]
    produce(kafka_topic, sent)
    env = _env(tmp_path)
    args = ["--db", db_url, "--kafka", kafka_bootstrap, "--topic", kafka_topic, "--group", group,
            "--batch-size", str(BATCH), "--batch-timeout", "1", "--consumer-config", "session.timeout.ms=6000",
            "--consumer-config", "heartbeat.interval.ms=500"]

    crashed = _crash_run(_consume("CrashingWriter", args, env, tmp_path), env, tmp_path, count_effects)
    offsets = sum(max(0, o) for o in committed(group, kafka_topic).values())
    assert offsets < crashed  # ... but its offsets were not committed: it will be redelivered

    def drained(total: int):
        return lambda: count_effects() == N and sum(max(0, o) for o in committed(group, kafka_topic).values()) == total

    stats = _restart_until(_consume("Writer", args, env, tmp_path), env, tmp_path, (drained(N), drained(2 * N)),
                           lambda: produce(kafka_topic, sent), helpers)  # the same 5,000 ids once more
    _check_exactly_once(engine, [m for m, _, _ in sent])
    assert stats["processed"] == N - crashed  # the restart processed only what the crash left
    assert stats["duplicates"] == N + crashed - offsets  # the crashed batch and all 5,000 again were no-ops
    assert stats["dead"] == 0 and stats["retries"] == 0


@pytest.mark.rabbitmq
def test_rabbitmq_5000_twice_sigkill_after_the_db_commit(engine, db_url, effects, count_effects, rabbitmq_url, queue,
                                                         helpers, tmp_path):
    sent = [(str(uuid.uuid4()), json.dumps({"n": i}).encode()) for i in range(N)]
    amqp_publish(rabbitmq_url, queue["exchange"], sent)
    env = _env(tmp_path)
    args = ["--db", db_url, "--rabbitmq", rabbitmq_url, "--queue", queue["queue"], "--batch-size", str(BATCH),
            "--batch-timeout", "1"]

    crashed = _crash_run(_consume("CrashingWriter", args, env, tmp_path), env, tmp_path, count_effects)
    # the killed connection hands its unacked deliveries back, the crashed batch among them
    helpers.wait(lambda: queue_depth(rabbitmq_url, queue["queue"]) > N - crashed, 30, "unacked deliveries back")

    # After the same 5,000 again comes one last new message: once its effect is there, every delivery before
    # it has been through a committed batch (one queue, one consumer: in order), and SIGTERM acks the last one.
    sentinel = (f"sentinel-{uuid.uuid4()}", b'{"n": -1}')
    stats = _restart_until(
        _consume("Writer", args, env, tmp_path), env, tmp_path,
        (lambda: count_effects() == N and queue_depth(rabbitmq_url, queue["queue"]) == 0,
         lambda: count_effects(sentinel[0]) == 1),
        lambda: amqp_publish(rabbitmq_url, queue["exchange"], [*sent, sentinel]), helpers)
    assert queue_depth(rabbitmq_url, queue["queue"]) == 0  # everything acked by the graceful exit
    _check_exactly_once(engine, [m for m, _ in sent], also=[sentinel[0]])
    assert stats["processed"] == N - crashed + 1  # what the crash left, and the sentinel
    assert stats["duplicates"] >= N + 1  # all 5,000 again, and the crashed batch's redeliveries, were no-ops
    assert stats["dead"] == 0 and stats["retries"] == 0
