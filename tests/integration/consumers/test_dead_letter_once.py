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
