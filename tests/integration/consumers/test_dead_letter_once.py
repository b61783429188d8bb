"""Dead letters are idempotent per (consumer, message): a redelivery never writes a second row (issue 10, item 3)."""

from __future__ import annotations

import pytest

from consumers import Status, list_dead_letters


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql", "mariadb"], indirect=True)
def test_dead_letters_are_written_once_per_message(dialect_name, engine, effects, recorder_cls, make_message):
    """A redelivery (Kafka after a crash before the offset commit) finds the open dead letter and updates it."""
    consumer = recorder_cls(max_attempts=1)
    poison = make_message(partition=1, offset=7, broker="kafka")
    consumer.failing = {poison.id}  # type: ignore[arg-type]

    def deliver() -> list[Status]:
        no_id = make_message(msg_id=None, partition=1, offset=8, broker="kafka")
        again = make_message(msg_id=poison.id, partition=1, offset=7, broker="kafka")
        return [o.status for o in consumer.process_batch(engine, [again, no_id])]

    assert deliver() == [Status.DEAD, Status.DEAD]
    assert deliver() == [Status.DEAD, Status.DEAD]
    rows = {d["message_id"]: d for d in list_dead_letters(engine)}
    assert set(rows) == {None, poison.id} and len(list_dead_letters(engine)) == 2
    assert rows[poison.id]["attempts"] == 2 and rows[None]["attempts"] == 2
    other = make_message(msg_id=None, partition=1, offset=9, broker="kafka")  # another message without id
    consumer.process_batch(engine, [other])
    assert len(list_dead_letters(engine)) == 3


def _waiting_on_a_lock(engine) -> bool:
    """Whether a transaction of this test database waits for a lock (the second consumer, held back)."""
    import sqlalchemy as sa

    with engine.connect() as c:
        if engine.dialect.name == "postgresql":
            q = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
        else:
            q = ("SELECT count(*) FROM information_schema.innodb_trx t JOIN information_schema.processlist p "
                 "ON p.id = t.trx_mysql_thread_id WHERE t.trx_state = 'LOCK WAIT' AND p.db = DATABASE()")
        return bool(c.execute(sa.text(q)).scalar())


@pytest.mark.parametrize("dialect_name", [
    "postgresql",
    pytest.param("mariadb", marks=pytest.mark.xfail(
        strict=False, reason="MariaDB: in about half the runs the second consumer is neither held by the first "
        "one's locking read nor done within 30 s; the SELECT ... FOR UPDATE hold-back is not proven there yet")),
], indirect=True)
@pytest.mark.parametrize("with_id", [True, False], ids=["with-id", "without-id"])
def test_two_consumers_dead_lettering_one_message_at_once_write_one_row(dialect_name, engine, effects, recorder_cls,
                                                                         make_message, with_id):
    """Two processes of one consumer (a RabbitMQ redelivery to a second process while the first one's
    dead-letter transaction is still open): the second one's dead letter waits for the first to commit,
    then updates its row. Neither runner fails, and one row is left, with both tries counted."""
    import threading
    import time

    first, second = recorder_cls(max_attempts=1), recorder_cls(max_attempts=1)
    poison = make_message(msg_id=None) if not with_id else make_message()
    first.failing = second.failing = {poison.id}  # type: ignore[assignment]
    outcomes: dict[str, object] = {}

    def run_second() -> None:
        try:
            outcomes["second"] = [o.status for o in second.process_batch(engine, [make_message(
                msg_id=poison.id, payload=poison.payload)])]
        except BaseException as exc:  # reported by the assertion below
            outcomes["second"] = exc

    def while_first_is_open() -> None:
        t = threading.Thread(target=run_second)
        t.start()
        deadline = time.monotonic() + 30
        while t.is_alive() and not _waiting_on_a_lock(engine):  # until it ran, or waits for us
            assert time.monotonic() < deadline, "the second consumer neither finished nor waited"
            t.join(0.02)
        outcomes["thread"] = t

    outcomes["first"] = [o.status for o in first.process_batch(engine, [poison], before_commit=while_first_is_open)]
    outcomes["thread"].join(60)  # type: ignore[attr-defined]
    assert outcomes["first"] == [Status.DEAD]
    assert outcomes["second"] == [Status.DEAD], outcomes["second"]
    rows = list_dead_letters(engine)
    assert len(rows) == 1, rows
    assert rows[0]["attempts"] == 2
