"""An in-memory broker adapter for unit tests: records what was published, fails on demand.

>>> pub = MemoryPublisher()
>>> pub.fail(lambda r: r.topic == "orders", Outcome.RETRY, "leader not available", times=1)
>>> pub.publish(records)          # the first "orders" message comes back RETRY, the rest DELIVERED
>>> pub.topic("invoices")         # what reached "invoices", in order
>>> pub.unavailable = True        # the next start()/publish() raises BrokerUnavailable

It is safe to drive from a relay thread while a test thread inspects it or changes its rules.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from ...errors import BrokerUnavailable, ConfigurationError
from ...message import OutboxRecord
from ..base import Codec, Outcome, PublishResult
from ..codecs import get_codec

__all__ = ["FailureRule", "MemoryPublisher", "PublishedMessage"]


@dataclass(frozen=True)
class PublishedMessage:
    """One message that reached the in-memory broker."""

    id: int
    message_id: uuid.UUID
    topic: str
    key: str | None
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    """The record's headers plus ``message-id`` (and ``content-type`` when set), as on Kafka."""
    content_type: str | None = None
    record: OutboxRecord | None = None


@dataclass
class FailureRule:
    predicate: Callable[[OutboxRecord], bool]
    outcome: Outcome
    reason: str
    times: int | None = None
    """How many more messages this rule applies to; ``None`` = for ever."""


class MemoryPublisher:
    """A :class:`~outbox.brokers.base.Publisher` that keeps messages in a list.

    :param topics: when given, only these topics exist; others fail like an unknown Kafka topic.
    :param max_payload_bytes: when given, bigger payloads fail like Kafka's ``MSG_SIZE_TOO_LARGE``.
    """

    def __init__(self, *, topics: Collection[str] | None = None, max_payload_bytes: int | None = None,
                 codec: Codec | str | None = None) -> None:
        self.codec = get_codec(codec)
        if topics is not None and (isinstance(topics, str) or not all(isinstance(t, str) for t in topics)):
            raise ConfigurationError("topics must be a collection of topic names (str)")
        if max_payload_bytes is not None and (
            isinstance(max_payload_bytes, bool) or not isinstance(max_payload_bytes, int) or max_payload_bytes < 1
        ):
            raise ConfigurationError(f"max_payload_bytes must be a positive integer, got {max_payload_bytes!r}")
        self.topics: set[str] | None = set(topics) if topics is not None else None
        self.max_payload_bytes = max_payload_bytes
        self.unavailable = False
        """Set to ``True`` to make ``start()`` and ``publish()`` raise BrokerUnavailable."""
        self.messages: list[PublishedMessage] = []
        self.batches: list[list[PublishResult]] = []
        """Every ``publish`` call's results, in call order."""
        self.started = False
        self.closed = False
        self.close_calls = 0
        self._rules: list[FailureRule] = []
        self._cond = threading.Condition(threading.RLock())

    # ------------------------------------------------------------------ programming outcomes

    def fail(
        self,
        predicate: Callable[[OutboxRecord], bool],
        outcome: Outcome = Outcome.FAILED,
        reason: str = "rejected by MemoryPublisher",
        *,
        times: int | None = None,
    ) -> FailureRule:
        """Give every record matching ``predicate`` this ``outcome`` (first matching rule wins)."""
        if outcome is Outcome.DELIVERED:
            raise ConfigurationError("fail() takes Outcome.RETRY or Outcome.FAILED")
        if times is not None and times < 1:
            raise ConfigurationError(f"times must be a positive integer or None, got {times!r}")
        rule = FailureRule(predicate, outcome, reason, times)
        with self._cond:
            self._rules.append(rule)
        return rule

    def clear_failures(self) -> None:
        with self._cond:
            self._rules.clear()

    # ------------------------------------------------------------------ inspection

    def topic(self, name: str) -> list[PublishedMessage]:
        """The messages published to ``name``, in order."""
        with self._cond:
            return [m for m in self.messages if m.topic == name]

    def by_topic(self) -> dict[str, list[PublishedMessage]]:
        with self._cond:
            out: dict[str, list[PublishedMessage]] = {}
            for m in self.messages:
                out.setdefault(m.topic, []).append(m)
            return out

    @property
    def published_ids(self) -> list[int]:
        with self._cond:
            return [m.id for m in self.messages]

    def snapshot(self) -> list[PublishedMessage]:
        """A copy of :attr:`messages`, safe to iterate while a relay thread publishes."""
        with self._cond:
            return list(self.messages)

    def wait_for(self, condition: int | Callable[[list[PublishedMessage]], bool], timeout: float = 10.0) -> bool:
        """Block until ``condition`` holds (an int: at least that many messages). True if it did."""
        check: Callable[[list[PublishedMessage]], bool] = (
            (lambda msgs: len(msgs) >= condition) if isinstance(condition, int) else condition  # type: ignore[misc]
        )
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()
            self.batches.clear()

    # ------------------------------------------------------------------ Publisher protocol

    def start(self) -> None:
        if self.unavailable:
            raise BrokerUnavailable("memory broker is unavailable (MemoryPublisher.unavailable is set)")
        self.started = True
        self.closed = False

    def _verdict(self, rec: OutboxRecord) -> tuple[Outcome, str | None]:
        for rule in self._rules:
            if rule.predicate(rec):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
                return rule.outcome, rule.reason
        if self.topics is not None and rec.topic not in self.topics:
            return Outcome.FAILED, f"UNKNOWN_TOPIC_OR_PART: unknown topic {rec.topic!r}"
        if self.max_payload_bytes is not None and len(rec.payload) > self.max_payload_bytes:
            return (
                Outcome.FAILED,
                f"MSG_SIZE_TOO_LARGE: message size {len(rec.payload):,} bytes is over the limit "
                f"of {self.max_payload_bytes:,}",
            )
        return Outcome.DELIVERED, None

    def publish(self, records: Sequence[OutboxRecord], *, timeout: float = 30.0) -> list[PublishResult]:
        if not self.started or self.closed:
            self.start()
        with self._cond:
            if self.unavailable:
                raise BrokerUnavailable("memory broker is unavailable (MemoryPublisher.unavailable is set)")
            results: list[PublishResult] = []
            failed_keys: set[str] = set()
            for rec in records:
                if rec.key is not None and rec.key in failed_keys:
                    results.append(PublishResult(rec.id, Outcome.RETRY, "held back: an earlier message with this key "
                                                 "failed in the same batch", held=True))
                    continue
                outcome, reason = self._verdict(rec)
                if outcome is not Outcome.DELIVERED and rec.key is not None:
                    failed_keys.add(rec.key)
                if outcome is Outcome.DELIVERED:
                    headers = self.codec.encode(rec, "kafka").headers
                    self.messages.append(
                        PublishedMessage(rec.id, rec.message_id, rec.topic, rec.key, rec.payload, headers,
                                         rec.content_type, rec)
                    )
                results.append(PublishResult(rec.id, outcome, reason))
            self.batches.append(list(results))
            self._cond.notify_all()
            return results

    def idle(self, timeout: float) -> None:
        """Nothing to serve in memory."""

    def flush(self, timeout: float = 30.0) -> None:
        return None

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self.close_calls += 1
            self.closed = True
            self.started = False
