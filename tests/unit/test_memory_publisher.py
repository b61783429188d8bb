"""MemoryPublisher: the in-memory adapter unit tests drive the relay with."""

from __future__ import annotations

import threading
import uuid

import pytest

from outbox.brokers import MESSAGE_ID_HEADER, MemoryPublisher, Outcome, Publisher
from outbox.errors import BrokerUnavailable, ConfigurationError
from outbox.message import OutboxRecord

_next = iter(range(1, 10**9))


def rec(topic="t", payload=b"{}", key=None, **kw):
    return OutboxRecord(id=next(_next), message_id=uuid.uuid4(), topic=topic, key=key, payload=payload, **kw)


def test_is_a_publisher():
    assert isinstance(MemoryPublisher(), Publisher)


def test_keeps_messages_in_order_with_a_per_topic_view():
    pub = MemoryPublisher()
    a, b, c = rec("orders", b"1", "k"), rec("invoices", b"2"), rec("orders", b"3", "k", content_type="text/plain")
    results = pub.publish([a, b, c])
    assert [r.id for r in results] == [a.id, b.id, c.id]
    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert [m.payload for m in pub.messages] == [b"1", b"2", b"3"]
    assert [m.id for m in pub.topic("orders")] == [a.id, c.id]
    assert set(pub.by_topic()) == {"orders", "invoices"}
    assert pub.published_ids == [a.id, b.id, c.id]
    assert pub.messages[2].headers == {MESSAGE_ID_HEADER: str(c.message_id), "content-type": "text/plain"}
    assert pub.batches == [results]


def test_programmed_failures_with_a_limited_count():
    pub = MemoryPublisher()
    pub.fail(lambda r: r.topic == "flaky", Outcome.RETRY, "leader not available", times=1)
    first = pub.publish([rec("flaky", key="a"), rec("flaky", key="b")])
    assert [r.outcome for r in first] == [Outcome.RETRY, Outcome.DELIVERED]
    assert first[0].error == "leader not available"
    assert pub.publish([rec("flaky")])[0].outcome is Outcome.DELIVERED


def test_first_matching_rule_wins_and_rules_can_be_cleared():
    pub = MemoryPublisher()
    pub.fail(lambda r: r.key == "x", Outcome.FAILED, "first")
    pub.fail(lambda r: True, Outcome.RETRY, "second")
    results = pub.publish([rec(key="x"), rec(key="y")])
    assert [(r.outcome, r.error) for r in results] == [(Outcome.FAILED, "first"), (Outcome.RETRY, "second")]
    pub.clear_failures()
    assert pub.publish([rec(key="x")])[0].outcome is Outcome.DELIVERED


def test_a_failure_holds_back_later_messages_with_the_same_key():
    pub = MemoryPublisher()
    pub.fail(lambda r: r.payload == b"bad", Outcome.FAILED, "poison")
    batch = [rec(key="k", payload=b"bad"), rec(key="other"), rec(key="k"), rec(key=None, payload=b"bad"), rec()]
    results = pub.publish(batch)
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.DELIVERED, Outcome.RETRY, Outcome.FAILED,
                                            Outcome.DELIVERED]
    assert [r.held for r in results] == [False, False, True, False, False]
    assert [m.id for m in pub.messages] == [batch[1].id, batch[4].id]


def test_known_topics_and_size_limit_emulate_broker_failures():
    pub = MemoryPublisher(topics={"known"}, max_payload_bytes=10)
    results = pub.publish([rec("unknown"), rec("known", b"x" * 11), rec("known", b"ok")])
    assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.FAILED, Outcome.DELIVERED]
    assert "UNKNOWN_TOPIC" in results[0].error
    assert "size" in results[1].error


def test_unavailable_raises_broker_unavailable():
    pub = MemoryPublisher()
    pub.unavailable = True
    with pytest.raises(BrokerUnavailable):
        pub.start()
    with pytest.raises(BrokerUnavailable):
        pub.publish([rec()])
    assert pub.messages == []
    pub.unavailable = False
    assert pub.publish([rec()])[0].outcome is Outcome.DELIVERED


def test_close_is_idempotent_and_publish_reopens():
    pub = MemoryPublisher()
    pub.close()
    pub.close()
    assert pub.close_calls == 2 and pub.closed
    assert pub.publish([rec()])[0].outcome is Outcome.DELIVERED
    assert pub.started and not pub.closed


def test_wait_for_sees_messages_from_another_thread():
    pub = MemoryPublisher()
    go = threading.Event()

    def relay():
        go.wait(5)
        for _ in range(5):
            pub.publish([rec(key="k")])

    t = threading.Thread(target=relay)
    t.start()
    go.set()
    assert pub.wait_for(5, timeout=10)
    assert pub.wait_for(lambda msgs: all(m.key == "k" for m in msgs), timeout=1)
    t.join(5)
    assert len(pub.snapshot()) == 5
    assert not pub.wait_for(6, timeout=0.05)


def test_concurrent_publishers_and_rule_changes_lose_nothing():
    pub = MemoryPublisher()
    barrier = threading.Barrier(3)

    def publish_many():
        barrier.wait(5)
        for _ in range(200):
            pub.publish([rec(key="k")])

    def toggle_rules():
        barrier.wait(5)
        for _ in range(200):
            pub.fail(lambda r: False, Outcome.RETRY, "never")
            pub.clear_failures()

    threads = [threading.Thread(target=publish_many), threading.Thread(target=publish_many),
               threading.Thread(target=toggle_rules)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(pub.messages) == 400
    assert len(pub.batches) == 400


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"topics": "orders"}, "topics"), ({"max_payload_bytes": 0}, "max_payload_bytes"),
     ({"max_payload_bytes": True}, "max_payload_bytes")],
)
def test_bad_settings(kwargs, named):
    with pytest.raises(ConfigurationError, match=named):
        MemoryPublisher(**kwargs)


def test_fail_rejects_delivered_and_bad_times():
    pub = MemoryPublisher()
    with pytest.raises(ConfigurationError, match=r"RETRY or Outcome\.FAILED"):
        pub.fail(lambda r: True, Outcome.DELIVERED)
    with pytest.raises(ConfigurationError, match="times"):
        pub.fail(lambda r: True, Outcome.RETRY, times=0)


def test_clear_forgets_messages_and_batches():
    pub = MemoryPublisher()
    pub.publish([rec()])
    pub.clear()
    assert pub.messages == [] and pub.batches == []


def test_the_adapters_delivered_result_is_an_ordinary_frozen_publish_result() -> None:
    import dataclasses

    from outbox.transports.base import Outcome, PublishResult, delivered

    got = delivered(42)
    assert type(got) is PublishResult and got == PublishResult(42, Outcome.DELIVERED)
    assert (got.error, got.held) == (None, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.id = 1  # type: ignore[misc]
