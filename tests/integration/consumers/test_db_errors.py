"""Both sides of the error classification on a real PostgreSQL (issue 10, item 1).

- transient: a lock timeout inside a handler, and a database outage (a TCP proxy of our own in
  front of PostgreSQL) are the database's trouble: the batch is retried until it works, no try
  is counted against a message, nothing is dead-lettered;
- data: a dead letter whose fields the database would refuse (NUL, over-long texts) is stored
  all the same, and everything else in the batch commits.
"""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa

from consumers import IncomingMessage, KafkaRunner, Status, list_dead_letters

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)

LOCKED = sa.Table("test_consumer_locked", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("n", sa.Integer, nullable=False))


def runner_for(consumer, engine) -> KafkaRunner:
    # only its DB-retry loop (RunnerCore.process) is used: no broker is contacted
    return KafkaRunner(consumer, engine=engine, bootstrap_servers="127.0.0.1:9", topics=["t"], group_id="g",
                       requeue_interval=None)


def msgs(make_message, n: int) -> list[IncomingMessage]:
    return [make_message(partition=0, offset=i, broker="kafka") for i in range(n)]


def test_lock_timeout_in_a_handler_is_retried_not_dead_lettered(engine, effects, count_effects, recorder_cls,
                                                                make_message, helpers):
    LOCKED.create(engine, checkfirst=True)
    with engine.begin() as c:
        c.execute(LOCKED.delete())
        c.execute(LOCKED.insert().values(id=1, n=0))
    tries: list[int] = []

    class Locking(recorder_cls):  # type: ignore[misc, valid-type]
        def handle(self, session, message):
            if message.offset == 2:
                tries.append(1)
                session.execute(sa.text("SET LOCAL lock_timeout = '100ms'"))
                session.execute(LOCKED.update().where(LOCKED.c.id == 1).values(n=LOCKED.c.n + 1))
            return super().handle(session, message)

    consumer = Locking(max_attempts=2)  # a miscounted lock timeout would dead-letter it after 2 tries
    runner = runner_for(consumer, engine)
    runner._db_wait = lambda state: 0.05  # test speed: the retry loop's backoff, not its logic
    batch = msgs(make_message, 5)
    holder = engine.connect()
    tx = holder.begin()
    holder.execute(sa.select(LOCKED).where(LOCKED.c.id == 1).with_for_update())
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(runner.process(batch)), daemon=True)
    t.start()
    try:
        helpers.wait(lambda: len(tries) >= 4, 60, "the handler to time out on the lock four times")
    finally:
        tx.rollback()
        holder.close()
    t.join(60)
    outcomes = result[0]
    assert [o.status for o in outcomes] == [Status.PROCESSED] * 5  # type: ignore[union-attr]
    assert list_dead_letters(engine) == [] and count_effects() == 5
    with engine.connect() as c:
        assert c.execute(sa.select(LOCKED.c.n)).scalar_one() == 1  # the locked update happened once


def test_database_outage_mid_batch_is_retried(dialect_name, db_url, engine, effects, count_effects, recorder_cls,
                                              make_message, helpers, fault_proxy):
    url = sa.engine.make_url(db_url)
    proxy = fault_proxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = sa.create_engine(url.set(host="127.0.0.1", port=proxy.port), pool_pre_ping=True)
    cut: list[int] = []

    class Outage(recorder_cls):  # type: ignore[misc, valid-type]
        def handle(self, session, message):
            if message.offset == 3 and not cut:
                cut.append(1)
                proxy.outage(hangup=True)  # the database goes away in the middle of the batch
            return super().handle(session, message)

    consumer = Outage(max_attempts=1)  # a miscounted outage would dead-letter at the first failure
    runner = runner_for(consumer, proxied)
    runner._db_wait = lambda state: 0.05
    batch = msgs(make_message, 6)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(runner.process(batch)), daemon=True)
    t.start()
    try:
        helpers.wait(lambda: proxy.stats().refused >= 3, 60, "the runner to retry against the outage")
    finally:
        proxy.accept()
    t.join(60)
    proxied.dispose()
    assert [o.status for o in result[0]] == [Status.PROCESSED] * 6  # type: ignore[union-attr]
    assert list_dead_letters(engine) == [] and count_effects() == 6
    for m in batch:
        assert count_effects(m.id) == 1


def test_dead_letter_fields_the_database_would_refuse(engine, effects, count_effects, recorder_cls, make_message):
    """NUL in headers, error and key, over-long topic/key/content type: stored anyway, the batch commits."""
    consumer = recorder_cls(max_attempts=1)
    bad = IncomingMessage(id=None, topic="t" * 255, key="k\x00" * 200, payload=b"\x00\xff",
                          headers={"h\x00": "v\x00", "big": "x" * 100_000},
                          content_type="application/json;" + "c" * 300, broker="rabbitmq", delivery_tag=1)
    poison = make_message(key="p\x00")
    consumer.failing = {poison.id}  # type: ignore[arg-type]
    good = [make_message() for _ in range(3)]
    outcomes = consumer.process_batch(engine, [good[0], bad, poison, *good[1:]])
    assert [o.status for o in outcomes] == [Status.PROCESSED, Status.DEAD, Status.DEAD, Status.PROCESSED,
                                            Status.PROCESSED]
    dead = {d["message_id"]: d for d in list_dead_letters(engine)}
    assert set(dead) == {None, poison.id}
    assert dead[None]["headers"]["~x:h%00"] == "~x:v%00" and len(dead[None]["topic"]) <= 249
    assert dead[None]["key"].startswith("~h:~x:k%00") and len(dead[None]["key"]) == 255
    assert len(dead[None]["content_type"]) == 127 and dead[None]["source"]["fingerprint"]
    assert "handler failed" in dead[poison.id]["error"] and dead[poison.id]["key"] == "~x:p%00"
    assert count_effects() == 3
    # the same message again (a redelivery): the open dead letter is updated, not duplicated
    again = IncomingMessage(id=None, topic=bad.topic, key=bad.key, payload=bad.payload, headers=dict(bad.headers),
                            content_type=bad.content_type, broker="rabbitmq", delivery_tag=7, redelivered=True)
    assert consumer.process_batch(engine, [again])[0].status is Status.DEAD
    rows = list_dead_letters(engine)
    assert len(rows) == 2 and {d["message_id"]: d for d in rows}[None]["attempts"] == 2


def test_unique_ids_stay_unique(engine, effects, count_effects, recorder_cls, make_message):
    consumer = recorder_cls()
    a, b = (make_message(msg_id=f"{uuid.uuid4()}\x00x") for _ in range(2))
    outcomes = consumer.process_batch(engine, [a, b])
    assert [o.status for o in outcomes] == [Status.PROCESSED, Status.PROCESSED]
    assert a.id.startswith("~x:") and a.id != b.id  # type: ignore[union-attr]

