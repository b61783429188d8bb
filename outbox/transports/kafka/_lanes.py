"""The Kafka runners' bookkeeping: one copy for the threaded and the asyncio runner.

Which partitions are ours, which are paused for a retry (and from which offset), what to commit
given a batch's outcomes, how a record becomes an :class:`IncomingMessage`, what a dead letter's
headers are (and the producer that sends them). The runners only do the consumer calls these
decisions name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from consumers._runner import check_str, check_topics
from consumers.base import Outcome, Status
from outbox._redact import mask_secrets
from outbox.errors import BrokerUnavailable, ConfigurationError
from outbox.incoming import IncomingMessage
from outbox.transports.base import MESSAGE_ID_HEADER, Codec
from outbox.transports.codecs import get_codec
from outbox.transports.received import kafka_message

log = logging.getLogger("consumers.kafka")

TP = tuple[str, int]

OWNED = {"enable.auto.commit": False, "enable.auto.offset.store": False}
FORWARDED_TO_PRODUCER = ("security.", "sasl.", "ssl.", "client.id", "socket.", "broker.address.family")


def consumer_config(extra: dict[str, Any], bootstrap_servers: str, group_id: str) -> dict[str, Any]:
    """The client settings: the user's, then the ones the runner owns (offsets after the DB commit)."""
    for k in extra:
        if not isinstance(k, str):
            raise ConfigurationError(f"config keys must be str, got {k!r}")
    for k, owned in OWNED.items():
        if k in extra and str(extra[k]).lower() not in (str(owned).lower(), "0" if not owned else "1"):
            raise ConfigurationError(f"config {k!r} is owned by the runner (offsets are committed after the "
                                     "database commit)")
    return {"auto.offset.reset": "earliest", **extra, "bootstrap.servers": bootstrap_servers, "group.id": group_id,
            **OWNED}


def producer_config(config: dict[str, Any], bootstrap_servers: str) -> dict[str, Any]:
    """The dead-letter producer's settings: the consumer's security and client settings."""
    conf = {k: v for k, v in config.items() if k.startswith(FORWARDED_TO_PRODUCER)}
    return {**conf, "bootstrap.servers": bootstrap_servers}


def partition_lag(committed: int, low: int, high: int) -> int:
    """High watermark minus the committed offset; a partition with no committed offset (negative)
    counts from its low watermark."""
    return max(0, int(high) - int(committed if committed >= 0 else low))


class KafkaSetup:
    """The settings both Kafka runners take (a mixin of theirs); ``self.consumer`` is set before."""

    consumer: Any

    def setup_kafka(self, *, bootstrap_servers: str, topics: Sequence[str] | str, group_id: str,
                    config: Mapping[str, Any] | None, dead_letter_topic: str | None,
                    codec: Codec | str | None) -> None:
        self.codec = get_codec(codec)
        self.bootstrap_servers = check_str("bootstrap_servers", bootstrap_servers)
        self.topics = check_topics(topics)
        self.group_id = check_str("group_id", group_id)
        if dead_letter_topic is not None:
            check_str("dead_letter_topic", dead_letter_topic)
        self.dead_letter_topic = dead_letter_topic
        self.config = consumer_config(dict(config or {}), self.bootstrap_servers, self.group_id)
        self.dead_letters = (None if dead_letter_topic is None else
                             DeadLetterSender(dead_letter_topic, self.config, self.bootstrap_servers,
                                              self.consumer.name))
        self.lanes = Lanes()

    def lag_partitions(self) -> list[TopicPartition]:
        """The assigned partitions whose lag the runners report, in order."""
        return [TopicPartition(t, p) for t, p in sorted(self.lanes.assigned)]

    def partitions_assigned(self, partitions: Iterable[Any]) -> None:
        """A rebalance gave this runner ``partitions`` (confluent ``TopicPartition`` objects)."""
        tps = [(p.topic, p.partition) for p in partitions]
        self.lanes.assign(tps)
        log.info("consumer %s: assigned %s", self.consumer.name, describe(tps))

    def partitions_revoked(self, partitions: Iterable[Any]) -> None:
        """A rebalance took ``partitions`` away. Both runners' callbacks run inside consume/poll,
        when the previous batch is committed (DB and offsets) and nothing is in flight: forget them."""
        tps = [(p.topic, p.partition) for p in partitions]
        self.lanes.revoke(tps)
        log.info("consumer %s: revoked %s", self.consumer.name, describe(tps))


@dataclass
class Retry:
    offset: int
    next_attempt: int
    first_failed_at: Any
    due: float


class Lanes:
    """Per-partition state: assigned, paused for a retry, the retry itself."""

    def __init__(self) -> None:
        self.assigned: set[TP] = set()
        self.paused: set[TP] = set()
        self.retry: dict[TP, Retry] = {}

    def assign(self, tps: Iterable[TP]) -> None:
        self.assigned.update(tps)

    def revoke(self, tps: Iterable[TP]) -> None:
        """Forget what we knew about these partitions: the new owner resumes from the committed offset."""
        for tp in tps:
            self.assigned.discard(tp)
            self.paused.discard(tp)
            self.retry.pop(tp, None)

    def accepts(self, tp: TP) -> bool:
        """A record of ``tp`` goes into a batch: ours, and not rewound for a retry (it comes back when due)."""
        return tp in self.assigned and tp not in self.paused

    def batch(self, raw: Sequence[Any], codec: Codec, group_id: str, consumer_name: str) -> list[IncomingMessage]:
        """The records of a ``consume()`` that go into a batch, decoded; a fatal client error raises."""
        batch: list[IncomingMessage] = []
        for km in raw:
            err = km.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise BrokerUnavailable(mask_secrets(f"Kafka consumer error: {err.str()}"))
                log.warning("consumer %s: %s", consumer_name, mask_secrets(err.str()))
                continue
            tp = (km.topic() or "", km.partition() or 0)
            if self.accepts(tp):  # else rewound for a retry, or no longer ours: it comes back when due
                batch.append(self.message(km, tp, codec, group_id))
        return batch

    def message(self, km: Any, tp: TP, codec: Codec, group_id: str) -> IncomingMessage:
        """A confluent-kafka ``Message`` (the sync and the asyncio client hand back the same type), decoded."""
        offset = km.offset() or 0
        msg = kafka_message(codec, tp[0], tp[1], offset, km.key(), km.value(), km.headers(), group_id=group_id, raw=km)
        retry = self.retry.get(tp)
        if retry is not None and retry.offset == offset:
            msg.attempt = retry.next_attempt
            msg.first_failed_at = retry.first_failed_at
            msg.redelivered = True
        return msg

    def commit_offsets(self, outcomes: Sequence[Outcome]) -> list[tuple[str, int, int]]:
        """Per owned partition, the offset past the leading run of settled messages: (topic, partition, offset)."""
        upto: dict[TP, int] = {}
        blocked: set[TP] = set()
        for o in outcomes:
            tp = o.message.lane
            if tp is None or tp in blocked:
                continue
            if o.done:
                upto[tp] = int(o.message.offset or 0) + 1
                r = self.retry.get(tp)
                if r is not None and r.offset == o.message.offset:
                    del self.retry[tp]
            else:
                blocked.add(tp)
        return [(t, p, off) for (t, p), off in upto.items() if (t, p) in self.assigned]

    def schedule_retries(self, outcomes: Sequence[Outcome]) -> list[tuple[str, int, int]]:
        """Record each RETRY; the partitions to pause and rewind: (topic, partition, offset)."""
        rewind = []
        for o in outcomes:
            if o.status is not Status.RETRY or o.message.lane is None:
                continue
            tp = o.message.lane
            m = o.message
            self.retry[tp] = Retry(int(m.offset or 0), m.attempt + 1, m.first_failed_at,
                                   time.monotonic() + (o.retry_in or 0.0))
            rewind.append((tp[0], tp[1], int(m.offset or 0)))
        return rewind

    def due(self) -> list[TP]:
        """Paused partitions whose retry is due: no longer paused; the runner resumes them."""
        if not self.paused:
            return []
        now = time.monotonic()
        out = []
        for tp in list(self.paused):
            r = self.retry.get(tp)
            if r is None or r.due <= now:
                self.paused.discard(tp)
                out.append(tp)
        return out


class DeadLetterSender:
    """Sends DEAD outcomes to ``topic`` (they are in the dead-letter table already: failures are logged).

    Blocking (``flush``): the asyncio runner calls it in a worker thread.
    """

    def __init__(self, topic: str, config: dict[str, Any], bootstrap_servers: str, consumer_name: str) -> None:
        self.topic = topic
        self.config = producer_config(config, bootstrap_servers)
        self.consumer_name = consumer_name
        self._producer: Any = None

    def send(self, outcomes: Sequence[Outcome]) -> None:
        dead = dead_letter_records(self.consumer_name, outcomes)
        if not dead:
            return
        if self._producer is None:
            self._producer = Producer(self.config)
        for value, key, headers in dead:
            try:
                self._producer.produce(self.topic, value=value, key=key, headers=list(headers.items()))
            except (KafkaException, BufferError) as exc:
                log.error("consumer %s: dead letter not sent to %s (it is in the dead-letter table): %s",
                          self.consumer_name, self.topic, mask_secrets(exc))
        left = self._producer.flush(10)
        if left:
            log.error("consumer %s: %d dead letter(s) not confirmed by %s (they are in the dead-letter table)",
                      self.consumer_name, left, self.topic)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5)


def dead_letter_records(consumer_name: str, outcomes: Sequence[Outcome]) -> list[tuple[bytes, Any, dict[str, Any]]]:
    """(value, key, headers) for each DEAD outcome, for the dead-letter topic."""
    out = []
    for o in outcomes:
        if o.status is not Status.DEAD:
            continue
        m = o.message
        headers = dict(m.headers)
        if m.id:
            headers[MESSAGE_ID_HEADER] = m.id
        headers.update({
            "x-dead-letter-consumer": consumer_name,
            "x-dead-letter-reason": mask_secrets(f"{type(o.error).__name__}: {o.error}")[:1000],
            "x-original-topic": m.topic,
            "x-original-partition": str(m.partition),
            "x-original-offset": str(m.offset),
        })
        out.append((m.payload, m.key, headers))
    return out


def describe(tps: Iterable[TP]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in tps) or "nothing"
