"""The Publisher contract, run against every adapter (memory, Kafka via tansu, real RabbitMQ).

The ``broker`` fixture (tests/contract/conftest.py) gives a fresh topic, makes publishers and reads
back what reached the broker.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from outbox.brokers import MESSAGE_ID_HEADER, Outcome, Publisher
from outbox.errors import BrokerUnavailable


def test_is_a_publisher(broker):
    assert isinstance(broker.publisher(), Publisher)


def test_idle_serves_the_connection_and_publishing_goes_on(broker, make_record):
    pub = broker.publisher()
    pub.idle(0.1)  # before start: nothing to serve, no error
    assert pub.publish([make_record(broker.topic, b"1", key="k")], timeout=30)[0].outcome is Outcome.DELIVERED
    pub.idle(0.2)
    assert pub.publish([make_record(broker.topic, b"2", key="k")], timeout=30)[0].outcome is Outcome.DELIVERED
    assert [m.payload for m in broker.read(2)] == [b"1", b"2"]


def test_empty_batch_gives_no_results(broker):
    pub = broker.publisher()
    pub.start()
    assert pub.publish([]) == []


def test_one_outcome_per_message_in_input_order(broker, make_record):
    pub = broker.publisher()
    pub.start()
    records = [make_record(broker.topic, f'{{"n": {i}}}'.encode(), key=None if i % 5 == 0 else f"k{i % 7}")
               for i in range(60)]
    results = pub.publish(records, timeout=30)
    assert [r.id for r in results] == [r.id for r in records]
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * len(records)
    assert all(r.error is None and not r.held for r in results)
    got = broker.read(len(records))
    assert sorted(m.message_id for m in got) == sorted(str(r.message_id) for r in records)


def test_per_key_order_at_the_broker(broker, make_record):
    pub = broker.publisher()
    pub.start()
    keys = [f"customer-{i}" for i in range(20)]
    records = [make_record(broker.topic, f"{n // 20}".encode(), key=keys[n % 20]) for n in range(2000)]
    results = []
    for start in range(0, len(records), 1000):
        results += pub.publish(records[start:start + 1000], timeout=60)
    assert all(r.outcome is Outcome.DELIVERED for r in results)

    got = broker.read(len(records), timeout=60)
    assert len(got) == len(records)
    sequences: dict[str | None, list[int]] = defaultdict(list)
    for m in got:
        sequences[m.key].append(int(m.payload))
    assert set(sequences) == set(keys)
    for key, seq in sequences.items():
        assert seq == sorted(seq), f"key {key} arrived out of order"
        assert seq == list(range(100)), f"key {key} is missing or repeating messages"


def test_headers_key_content_type_and_message_id_round_trip(broker, make_record):
    pub = broker.publisher()
    pub.start()
    keyed = make_record(broker.topic, b'{"total": 12.5}', key="order-17",
                        headers={"trace-id": "abc-123", "tenant": "ünïcode"}, content_type="application/json")
    keyless = make_record(broker.topic, b"\x00\x01binary", headers={}, content_type=None)
    results = pub.publish([keyed, keyless])
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]

    got = {m.message_id: m for m in broker.read(2)}
    a, b = got[str(keyed.message_id)], got[str(keyless.message_id)]
    assert a.topic == broker.topic
    assert a.key == "order-17"
    assert a.payload == keyed.payload
    assert a.content_type == "application/json"
    assert a.headers["trace-id"] == "abc-123"
    assert a.headers["tenant"] == "ünïcode"
    assert a.headers[MESSAGE_ID_HEADER] == str(keyed.message_id)
    assert b.key is None
    assert b.payload == b"\x00\x01binary"
    assert not b.content_type
    assert b.headers[MESSAGE_ID_HEADER] == str(keyless.message_id)


def test_a_record_header_cannot_spoof_the_message_id(broker, make_record):
    pub = broker.publisher()
    rec = make_record(broker.topic, b"{}", key="k", headers={MESSAGE_ID_HEADER: "spoofed"})
    assert pub.publish([rec])[0].outcome is Outcome.DELIVERED
    (got,) = broker.read(1)
    assert got.message_id == str(rec.message_id)
    assert got.headers[MESSAGE_ID_HEADER] == str(rec.message_id)


def test_large_payload_is_delivered(broker, make_record):
    pub = broker.publisher()
    payload = bytes(range(256)) * (900_000 // 256)
    rec = make_record(broker.topic, payload, key="big")
    assert pub.publish([rec], timeout=30)[0].outcome is Outcome.DELIVERED
    (got,) = broker.read(1)
    assert got.payload == payload


def test_too_large_fails_with_a_size_reason_and_the_batch_goes_on(broker, make_record):
    pub = broker.publisher()
    pub.start()
    before = make_record(broker.topic, b"1", key="a")
    big = make_record(broker.topic, b"x" * 1_200_000, key="b")
    other = make_record(broker.topic, b"2", key="c")
    behind = make_record(broker.topic, b"3", key="b")  # same key as the failed one
    results = pub.publish([before, big, other, behind], timeout=30)

    assert [r.id for r in results] == [before.id, big.id, other.id, behind.id]
    assert results[0].outcome is Outcome.DELIVERED
    assert results[1].outcome is Outcome.FAILED
    assert "size" in (results[1].error or "").lower()
    assert results[2].outcome is Outcome.DELIVERED
    # per-key order: the later message with the failed one's key is not sent
    assert results[3].outcome is Outcome.RETRY and results[3].held
    got = broker.read(2)
    assert sorted(m.payload for m in got) == [b"1", b"2"]


def test_unknown_topic_is_reported_with_the_broker_reason(broker, make_record):
    pub = broker.publisher()
    pub.start()
    batch = [
        make_record(broker.topic, b"1", key="a"),
        make_record(broker.missing_topic, b"lost", key="b"),
        make_record(broker.topic, b"2", key="c"),
    ]
    results = pub.publish(batch, timeout=30)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, broker.unknown_topic_outcome, Outcome.DELIVERED]
    assert broker.unknown_topic_marker in (results[1].error or "")
    assert not results[1].held
    assert sorted(m.payload for m in broker.read(2)) == [b"1", b"2"]


def test_unknown_topic_keeps_its_outcome_in_the_next_batch(broker, make_record):
    pub = broker.publisher()
    first = pub.publish([make_record(broker.missing_topic, b"x", key="k")], timeout=30)
    second = pub.publish([make_record(broker.missing_topic, b"y", key="k"), make_record(broker.topic, b"ok")],
                         timeout=30)
    assert first[0].outcome is broker.unknown_topic_outcome
    assert [r.outcome for r in second] == [broker.unknown_topic_outcome, Outcome.DELIVERED]


def test_close_flushes_what_was_sent_without_waiting(broker, make_record):
    pub = broker.publisher()
    pub.start()
    records = [make_record(broker.topic, f"{i}".encode(), key=f"k{i % 3}") for i in range(300)]
    results = pub.publish(records, timeout=0)  # do not wait for the broker's verdicts
    assert [r.id for r in results] == [r.id for r in records]
    assert all(r.outcome in (Outcome.DELIVERED, Outcome.RETRY) for r in results)
    pub.close(timeout=30)
    got = broker.read(len(records))
    assert {m.message_id for m in got} == {str(r.message_id) for r in records}


def test_flush_waits_for_what_was_sent(broker, make_record):
    pub = broker.publisher()
    records = [make_record(broker.topic, f"{i}".encode(), key="k") for i in range(100)]
    pub.publish(records, timeout=0)
    pub.flush(timeout=30)
    got = broker.read(len(records))
    assert [int(m.payload) for m in got] == list(range(100))


def test_close_twice_is_safe(broker, make_record):
    pub = broker.publisher()
    pub.start()
    assert pub.publish([make_record(broker.topic, b"{}")])[0].outcome is Outcome.DELIVERED
    pub.close()
    pub.close()
    never_started = broker.publisher()
    never_started.close()
    never_started.close()


def test_start_is_idempotent(broker, make_record):
    pub = broker.publisher()
    pub.start()
    pub.start()
    assert pub.publish([make_record(broker.topic, b"{}")])[0].outcome is Outcome.DELIVERED


def test_broker_unavailable_at_start_hides_the_password(broker, make_record):
    pub, secret = broker.unreachable()
    try:
        with pytest.raises(BrokerUnavailable) as info:
            pub.start()
        assert secret not in str(info.value)
        assert secret not in repr(info.value)
        with pytest.raises(BrokerUnavailable) as info2:
            pub.publish([make_record(broker.topic, b"{}")], timeout=2)
        assert secret not in str(info2.value)
    finally:
        pub.close(timeout=1)
