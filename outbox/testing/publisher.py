"""The Publisher contract suite: what ``outbox relay`` relies on from every transport's publisher.

Subclass :class:`PublisherContract` in a test module, set ``features`` and provide a ``harness``
fixture returning a :class:`PublisherHarness`::

    class TestNatsPublisher(PublisherContract):
        features = Features(missing_topic=Outcome.FAILED, missing_topic_reason="no stream")

        @pytest.fixture
        def harness(self, nats_url):
            ...
            return PublisherHarness(topic=..., missing_topic=..., make=..., read=..., unreachable=...)

Every test gets a fresh harness; publishers made with ``harness.publisher()`` are closed after it.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from ..errors import BrokerUnavailable
from ..transports.base import MESSAGE_ID_HEADER, Outcome, Publisher
from ._features import Features
from ._records import record

__all__ = ["PublisherContract", "PublisherHarness", "Received"]

#: The broker timestamp the timestamp test writes as the row's ``created_at`` (millisecond precision).
STAMP = dt.datetime(2021, 2, 3, 4, 5, 6, 789000, tzinfo=dt.timezone.utc)


@dataclass
class Received:
    """A message as the harness read it back from the broker, with an independent client."""

    topic: str
    key: str | None
    payload: bytes
    headers: dict[str, str]
    content_type: str | None
    message_id: str | None
    """The outbox message id as the broker carries it (Kafka ``message-id`` header, AMQP ``message_id``)."""
    timestamp: dt.datetime | None = None
    """The broker timestamp (only read when ``Features.broker_timestamps``)."""
    properties: dict[str, Any] = field(default_factory=dict)
    """Message properties besides headers (only read when ``Features.message_properties``)."""


@dataclass
class PublisherHarness:
    """What a transport gives the publisher suite: a fresh topic, a publisher factory, a reader."""

    topic: str
    """A topic (exchange, subject, directory...) that exists and that :attr:`read` reads."""
    missing_topic: str
    """A topic that does not exist."""
    make: Callable[..., Publisher]
    """``make(**overrides)``: a new publisher aimed at the broker (overrides: transport options)."""
    read: Callable[[int, float], list[Received]]
    """``read(n, timeout)``: wait until ``n`` messages in all (since the start) reached :attr:`topic`,
    and return them all in the order the broker holds them (per key at least)."""
    unreachable: Callable[[], tuple[Publisher, str]] | None = None
    """A publisher aimed at a closed port, and the secret its settings carry (``Features.credentials``)."""
    created: list[Publisher] = field(default_factory=list)

    def publisher(self, **overrides: Any) -> Publisher:
        pub = self.make(**overrides)
        self.created.append(pub)
        return pub


class PublisherContract:
    """The publisher contract: subclass it (name the subclass ``Test...``), set :attr:`features`,
    override the ``harness`` fixture."""

    features: ClassVar[Features] = Features()

    @pytest.fixture
    def harness(self) -> PublisherHarness:
        raise NotImplementedError(f"{type(self).__name__} must define a `harness` fixture returning a "
                                  "PublisherHarness (see outbox.testing)")

    @pytest.fixture(autouse=True)
    def _close_publishers(self, harness: PublisherHarness) -> Iterator[None]:
        yield
        for pub in harness.created:
            try:
                pub.close(timeout=5)
            except Exception:  # a publisher broken by the test must not hide its result
                pass

    def _needs(self, flag: str) -> None:
        value = getattr(self.features, flag)
        if value is None or value is False:
            pytest.skip(f"the transport does not claim Features.{flag}")

    # ------------------------------------------------------------------ the tests

    def test_is_a_publisher(self, harness: PublisherHarness) -> None:
        assert isinstance(harness.publisher(), Publisher)

    def test_idle_serves_the_connection_and_publishing_goes_on(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        pub.idle(0.1)  # before start: nothing to serve, no error
        assert pub.publish([record(harness.topic, b"1", key="k")], timeout=30)[0].outcome is Outcome.DELIVERED
        pub.idle(0.2)
        assert pub.publish([record(harness.topic, b"2", key="k")], timeout=30)[0].outcome is Outcome.DELIVERED
        assert [m.payload for m in harness.read(2, 30.0)] == [b"1", b"2"]

    def test_empty_batch_gives_no_results(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        pub.start()
        assert pub.publish([]) == []

    def test_one_outcome_per_message_in_input_order(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        pub.start()
        records = [record(harness.topic, f'{{"n": {i}}}'.encode(), key=None if i % 5 == 0 else f"k{i % 7}")
                   for i in range(60)]
        results = pub.publish(records, timeout=30)
        assert [r.id for r in results] == [r.id for r in records]
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * len(records)
        assert all(r.error is None and not r.held for r in results)
        got = harness.read(len(records), 30.0)
        assert sorted(m.message_id or "" for m in got) == sorted(str(r.message_id) for r in records)

    def test_per_key_order_at_the_broker(self, harness: PublisherHarness) -> None:
        self._needs("per_key_order")
        pub = harness.publisher()
        pub.start()
        keys = [f"customer-{i}" for i in range(20)]
        records = [record(harness.topic, f"{n // 20}".encode(), key=keys[n % 20]) for n in range(2000)]
        results = []
        for start in range(0, len(records), 1000):
            results += pub.publish(records[start:start + 1000], timeout=60)
        assert all(r.outcome is Outcome.DELIVERED for r in results)

        got = harness.read(len(records), 60.0)
        assert len(got) == len(records)
        sequences: dict[str | None, list[int]] = defaultdict(list)
        for m in got:
            sequences[m.key].append(int(m.payload))
        assert set(sequences) == set(keys)
        for key, seq in sequences.items():
            assert seq == sorted(seq), f"key {key} arrived out of order"
            assert seq == list(range(100)), f"key {key} is missing or repeating messages"

    def test_begin_publish_then_wait_gives_the_verdicts_in_order(self, harness: PublisherHarness) -> None:
        """A publisher with ``begin_publish`` (the relay pipelines with it: it claims the next batch
        between the send and the wait) gives the same verdicts as ``publish``, keeps per-key order
        across batches begun back to back, and goes on after a batch begun and never waited for
        (the relay gives a batch up when its claim ahead fails)."""
        pub = harness.publisher()
        if getattr(type(pub), "begin_publish", None) is None:
            pytest.skip("the publisher has no begin_publish: the relay sends one batch at a time")
        pub.start()
        first = [record(harness.topic, f"{n}".encode(), key=f"k{n % 5}") for n in range(0, 300)]
        second = [record(harness.topic, f"{n}".encode(), key=f"k{n % 5}") for n in range(300, 600)]
        wait = pub.begin_publish(first, timeout=30)  # type: ignore[attr-defined]
        results = wait()
        wait = pub.begin_publish(second, timeout=30)  # type: ignore[attr-defined]
        results += wait()
        assert [r.id for r in results] == [r.id for r in first + second]
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 600
        assert pub.begin_publish([], timeout=30)() == []  # type: ignore[attr-defined]
        pub.begin_publish([record(harness.topic, b"600", key="k0")], timeout=30)  # type: ignore[attr-defined]
        last = pub.publish([record(harness.topic, b"601", key="k1")], timeout=30)  # never waited for the one before
        assert [r.outcome for r in last] == [Outcome.DELIVERED]
        got = harness.read(602, 60.0)
        sequences: dict[str | None, list[int]] = defaultdict(list)
        for m in got:
            sequences[m.key].append(int(m.payload))
        for key, seq in sequences.items():
            assert seq == sorted(seq), f"key {key} arrived out of order"
        assert sorted(n for seq in sequences.values() for n in seq)[:600] == list(range(600))
        assert 601 in sequences["k1"]

    def test_headers_key_content_type_and_message_id_round_trip(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        pub.start()
        keyed = record(harness.topic, b'{"total": 12.5}', key="order-17",
                       headers={"trace-id": "abc-123", "tenant": "ünïcode"}, content_type="application/json")
        keyless = record(harness.topic, b"\x00\x01binary", headers={}, content_type=None)
        results = pub.publish([keyed, keyless])
        assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]

        got = {m.message_id: m for m in harness.read(2, 30.0)}
        a, b = got[str(keyed.message_id)], got[str(keyless.message_id)]
        assert a.topic == harness.topic
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

    def test_a_record_header_cannot_spoof_the_message_id(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        rec = record(harness.topic, b"{}", key="k", headers={MESSAGE_ID_HEADER: "spoofed"})
        assert pub.publish([rec])[0].outcome is Outcome.DELIVERED
        (got,) = harness.read(1, 30.0)
        assert got.message_id == str(rec.message_id)
        assert got.headers[MESSAGE_ID_HEADER] == str(rec.message_id)

    def test_broker_timestamp_is_the_rows_created_at(self, harness: PublisherHarness) -> None:
        self._needs("broker_timestamps")
        pub = harness.publisher()
        stamped = record(harness.topic, b"old", key="k", created_at=STAMP)
        assert pub.publish([stamped], timeout=30)[0].outcome is Outcome.DELIVERED
        (got,) = harness.read(1, 30.0)
        assert got.timestamp is not None, "the harness read no broker timestamp"
        # AMQP's timestamp has whole seconds; Kafka's CreateTime milliseconds
        assert abs((got.timestamp - STAMP).total_seconds()) < 1.0, got.timestamp

    def test_message_properties_carry_id_and_content_type(self, harness: PublisherHarness) -> None:
        self._needs("message_properties")
        pub = harness.publisher()
        rec = record(harness.topic, b"{}", key="k", content_type="application/json")
        assert pub.publish([rec], timeout=30)[0].outcome is Outcome.DELIVERED
        (got,) = harness.read(1, 30.0)
        assert got.properties.get("message_id") == str(rec.message_id)
        assert got.properties.get("content_type") == "application/json"
        assert got.properties.get("delivery_mode") == 2, "outbox messages must be persistent"

    def test_large_payload_is_delivered(self, harness: PublisherHarness) -> None:
        self._needs("size_limit")
        pub = harness.publisher()
        payload = bytes(range(256)) * (900_000 // 256)
        rec = record(harness.topic, payload, key="big")
        assert pub.publish([rec], timeout=30)[0].outcome is Outcome.DELIVERED
        (got,) = harness.read(1, 30.0)
        assert got.payload == payload

    def test_too_large_fails_with_a_size_reason_and_the_batch_goes_on(self, harness: PublisherHarness) -> None:
        self._needs("size_limit")
        pub = harness.publisher()
        pub.start()
        before = record(harness.topic, b"1", key="a")
        big = record(harness.topic, b"x" * 1_200_000, key="b")
        other = record(harness.topic, b"2", key="c")
        behind = record(harness.topic, b"3", key="b")  # same key as the failed one
        results = pub.publish([before, big, other, behind], timeout=30)

        assert [r.id for r in results] == [before.id, big.id, other.id, behind.id]
        assert results[0].outcome is Outcome.DELIVERED
        assert results[1].outcome is Outcome.FAILED
        assert "size" in (results[1].error or "").lower()
        assert results[2].outcome is Outcome.DELIVERED
        # per-key order: the later message with the failed one's key is not sent
        assert results[3].outcome is Outcome.RETRY and results[3].held
        got = harness.read(2, 30.0)
        assert sorted(m.payload for m in got) == [b"1", b"2"]

    def test_unknown_topic_is_reported_with_the_broker_reason(self, harness: PublisherHarness) -> None:
        self._needs("missing_topic")
        pub = harness.publisher()
        pub.start()
        batch = [
            record(harness.topic, b"1", key="a"),
            record(harness.missing_topic, b"lost", key="b"),
            record(harness.topic, b"2", key="c"),
        ]
        results = pub.publish(batch, timeout=30)
        assert [r.outcome for r in results] == [Outcome.DELIVERED, self.features.missing_topic, Outcome.DELIVERED]
        assert self.features.missing_topic_reason in (results[1].error or "")
        assert not results[1].held
        assert sorted(m.payload for m in harness.read(2, 30.0)) == [b"1", b"2"]

    def test_unknown_topic_keeps_its_outcome_in_the_next_batch(self, harness: PublisherHarness) -> None:
        self._needs("missing_topic")
        pub = harness.publisher()
        first = pub.publish([record(harness.missing_topic, b"x", key="k")], timeout=30)
        second = pub.publish([record(harness.missing_topic, b"y", key="k"), record(harness.topic, b"ok")],
                             timeout=30)
        assert first[0].outcome is self.features.missing_topic
        assert [r.outcome for r in second] == [self.features.missing_topic, Outcome.DELIVERED]

    def test_close_flushes_what_was_sent_without_waiting(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        pub.start()
        records = [record(harness.topic, f"{i}".encode(), key=f"k{i % 3}") for i in range(300)]
        results = pub.publish(records, timeout=0)  # do not wait for the broker's verdicts
        assert [r.id for r in results] == [r.id for r in records]
        assert all(r.outcome in (Outcome.DELIVERED, Outcome.RETRY) for r in results)
        pub.close(timeout=30)
        got = harness.read(len(records), 30.0)
        assert {m.message_id for m in got} == {str(r.message_id) for r in records}

    def test_flush_waits_for_what_was_sent(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        records = [record(harness.topic, f"{i}".encode(), key="k") for i in range(100)]
        pub.publish(records, timeout=0)
        pub.flush(timeout=30)
        got = harness.read(len(records), 30.0)
        assert [int(m.payload) for m in got] == list(range(100))

    def test_close_twice_is_safe(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        pub.start()
        assert pub.publish([record(harness.topic, b"{}")])[0].outcome is Outcome.DELIVERED
        pub.close()
        pub.close()
        never_started = harness.publisher()
        never_started.close()
        never_started.close()

    def test_start_is_idempotent(self, harness: PublisherHarness) -> None:
        pub = harness.publisher()
        pub.start()
        pub.start()
        assert pub.publish([record(harness.topic, b"{}")])[0].outcome is Outcome.DELIVERED

    def test_broker_unavailable_at_start_hides_the_password(self, harness: PublisherHarness) -> None:
        self._needs("credentials")
        if harness.unreachable is None:
            pytest.fail("Features.credentials is set but the harness gives no `unreachable` publisher")
        pub, secret = harness.unreachable()
        try:
            with pytest.raises(BrokerUnavailable) as info:
                pub.start()
            assert secret not in str(info.value)
            assert secret not in repr(info.value)
            with pytest.raises(BrokerUnavailable) as info2:
                pub.publish([record(harness.topic, b"{}")], timeout=2)
            assert secret not in str(info2.value)
        finally:
            pub.close(timeout=1)
