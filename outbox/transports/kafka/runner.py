"""Run a dedup consumer on Kafka (confluent-kafka).

Offsets are committed by hand, synchronously, and only after the batch's database transaction
committed: a crash in between redelivers messages whose ids are already in the processed table,
so they are no-ops.

Retries and ordering: a message whose handler fails is retried after a backoff; meanwhile its
partition is paused and rewound to it (later messages of that partition wait, keeping per-key
order), while every other partition keeps flowing. After ``max_attempts`` it goes to the dead
letters (and to ``dead_letter_topic`` if set) and the partition moves on.

Rebalances: batches are processed and committed between polls, so when partitions are revoked
(inside ``poll``) nothing is in flight; retry state of revoked partitions is dropped and the new
owner resumes from the last committed offset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumers._runner import RunnerCore, check_str, check_topics
from consumers.base import DedupConsumer, Outcome, Status
from outbox._redact import mask_secrets
from outbox.errors import BrokerUnavailable, ConfigurationError
from outbox.incoming import IncomingMessage
from outbox.transports.base import MESSAGE_ID_HEADER, Codec
from outbox.transports.codecs import get_codec
from outbox.transports.received import kafka_message

__all__ = ["KafkaRunner"]

log = logging.getLogger("consumers.kafka")

_OWNED = {"enable.auto.commit": False, "enable.auto.offset.store": False}
_FORWARDED_TO_PRODUCER = ("security.", "sasl.", "ssl.", "client.id", "socket.", "broker.address.family")


@dataclass
class _Retry:
    offset: int
    next_attempt: int
    first_failed_at: Any
    due: float


class KafkaRunner(RunnerCore):
    """Consume ``topics`` as group ``group_id`` and feed batches to ``consumer``.

    ``config`` is passed to the confluent-kafka ``Consumer`` (e.g. ``session.timeout.ms``,
    ``auto.offset.reset``, security settings); ``enable.auto.commit`` and
    ``enable.auto.offset.store`` are owned by the runner.
    """

    def __init__(
        self,
        consumer: DedupConsumer,
        *,
        engine: sa.Engine,
        bootstrap_servers: str,
        topics: Sequence[str] | str,
        group_id: str,
        config: Mapping[str, Any] | None = None,
        batch_size: int = 500,
        batch_timeout: float = 0.5,
        dead_letter_topic: str | None = None,
        requeue_interval: float | None = 30.0,
        commit_timeout: float = 10.0,
        codec: Codec | str | None = None,
    ) -> None:
        super().__init__(consumer, engine=engine, batch_size=batch_size, batch_timeout=batch_timeout,
                         requeue_interval=requeue_interval)
        self.codec = get_codec(codec)
        self.bootstrap_servers = check_str("bootstrap_servers", bootstrap_servers)
        self.topics = check_topics(topics)
        self.group_id = check_str("group_id", group_id)
        if dead_letter_topic is not None:
            check_str("dead_letter_topic", dead_letter_topic)
        self.dead_letter_topic = dead_letter_topic
        extra = dict(config or {})
        for k in extra:
            if not isinstance(k, str):
                raise ConfigurationError(f"config keys must be str, got {k!r}")
        for k, owned in _OWNED.items():
            if k in extra and str(extra[k]).lower() not in (str(owned).lower(), "0" if not owned else "1"):
                raise ConfigurationError(f"config {k!r} is owned by the runner (offsets are committed after the "
                                         "database commit)")
        self.config = {"auto.offset.reset": "earliest", **extra, "bootstrap.servers": self.bootstrap_servers,
                       "group.id": self.group_id, **_OWNED}
        self.commit_timeout = commit_timeout
        self._kc: Consumer | None = None
        self._producer: Producer | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._paused: set[tuple[str, int]] = set()
        self._retry: dict[tuple[str, int], _Retry] = {}

    # ------------------------------------------------------------------ rebalance callbacks
    def _on_assign(self, kc: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self._assigned.add((p.topic, p.partition))
        log.info("consumer %s: assigned %s", self.consumer.name, _tps(partitions))

    def _on_revoke(self, kc: Consumer, partitions: list[TopicPartition]) -> None:
        # Called inside poll/consume: the previous batch is already committed (DB and offsets),
        # so nothing is in flight. Forget what we knew about these partitions.
        for p in partitions:
            tp = (p.topic, p.partition)
            self._assigned.discard(tp)
            self._paused.discard(tp)
            self._retry.pop(tp, None)
        log.info("consumer %s: revoked %s", self.consumer.name, _tps(partitions))

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Consume until :meth:`stop`; the batch in hand is finished (DB commit, offset commit) first."""
        kc = Consumer(self.config, logger=log)
        self._kc = kc
        try:
            kc.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)
            log.info("consumer %s: consuming %s as group %s", self.consumer.name, ", ".join(self.topics),
                     self.group_id)
            while not self.stopping:
                self._resume_due(kc)
                self.maybe_process_requeued()
                batch = self._poll(kc)
                if not batch:
                    continue
                outcomes = self.process(batch)
                if outcomes is None:
                    break
                self._commit(kc, outcomes)
                self._schedule_retries(kc, outcomes)
                self._publish_dead(outcomes)
        finally:
            self._kc = None
            try:
                kc.close()
            except (KafkaException, RuntimeError) as exc:  # pragma: no cover - best effort
                log.warning("consumer %s: close failed: %s", self.consumer.name, mask_secrets(exc))
            if self._producer is not None:
                self._producer.flush(5)
            log.info("consumer %s: stopped (%s)", self.consumer.name, self.stats)

    def _poll(self, kc: Consumer) -> list[IncomingMessage]:
        try:
            raw = kc.consume(num_messages=self.batch_size, timeout=self.batch_timeout)
        except KafkaException as exc:
            raise BrokerUnavailable(mask_secrets(f"Kafka consume failed: {exc}")) from None
        batch: list[IncomingMessage] = []
        for km in raw:
            err = km.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise BrokerUnavailable(mask_secrets(f"Kafka consumer error: {err.str()}"))
                log.warning("consumer %s: %s", self.consumer.name, mask_secrets(err.str()))
                continue
            tp = (km.topic() or "", km.partition() or 0)
            if tp in self._paused or tp not in self._assigned:
                continue  # rewound for a retry, or no longer ours: it comes back when due
            batch.append(self._message(km, tp))
        return batch

    def _message(self, km: Message, tp: tuple[str, int]) -> IncomingMessage:
        offset = km.offset() or 0
        msg = kafka_message(self.codec, tp[0], tp[1], offset, km.key(), km.value(), km.headers(),
                            group_id=self.group_id, raw=km)
        retry = self._retry.get(tp)
        if retry is not None and retry.offset == offset:
            msg.attempt = retry.next_attempt
            msg.first_failed_at = retry.first_failed_at
            msg.redelivered = True
        return msg

    def _commit(self, kc: Consumer, outcomes: Sequence[Outcome]) -> None:
        """Commit, per partition, past the leading run of settled messages."""
        upto: dict[tuple[str, int], int] = {}
        blocked: set[tuple[str, int]] = set()
        for o in outcomes:
            tp = o.message.lane
            if tp is None or tp in blocked:
                continue
            if o.done:
                upto[tp] = int(o.message.offset or 0) + 1
                r = self._retry.get(tp)
                if r is not None and r.offset == o.message.offset:
                    del self._retry[tp]
            else:
                blocked.add(tp)
        if not upto:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in upto.items() if (t, p) in self._assigned]
        if not offsets:
            return
        try:
            kc.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The database already has these messages: a redelivery is a no-op.
            log.warning("consumer %s: offset commit failed (messages will be redelivered as no-ops): %s",
                        self.consumer.name, mask_secrets(exc))

    def _schedule_retries(self, kc: Consumer, outcomes: Sequence[Outcome]) -> None:
        for o in outcomes:
            if o.status is not Status.RETRY or o.message.lane is None:
                continue
            tp = o.message.lane
            m = o.message
            self._retry[tp] = _Retry(int(m.offset or 0), m.attempt + 1, m.first_failed_at,
                                     time.monotonic() + (o.retry_in or 0.0))
            part = TopicPartition(tp[0], tp[1], int(m.offset or 0))
            try:
                kc.pause([part])
                self._paused.add(tp)
                kc.seek(part)
            except KafkaException as exc:
                log.warning("consumer %s: cannot rewind %s[%d] for a retry: %s", self.consumer.name, tp[0], tp[1],
                            mask_secrets(exc))

    def _resume_due(self, kc: Consumer) -> None:
        if not self._paused:
            return
        now = time.monotonic()
        for tp in list(self._paused):
            r = self._retry.get(tp)
            if r is None or r.due <= now:
                self._paused.discard(tp)
                try:
                    kc.resume([TopicPartition(tp[0], tp[1])])
                except KafkaException as exc:  # pragma: no cover - revoked meanwhile
                    log.warning("consumer %s: cannot resume %s[%d]: %s", self.consumer.name, tp[0], tp[1],
                                mask_secrets(exc))

    def _publish_dead(self, outcomes: Sequence[Outcome]) -> None:
        if self.dead_letter_topic is None:
            return
        dead = [o for o in outcomes if o.status is Status.DEAD]
        if not dead:
            return
        if self._producer is None:
            conf = {k: v for k, v in self.config.items() if k.startswith(_FORWARDED_TO_PRODUCER)}
            self._producer = Producer({**conf, "bootstrap.servers": self.bootstrap_servers})
        for o in dead:
            m = o.message
            headers = dict(m.headers)
            if m.id:
                headers[MESSAGE_ID_HEADER] = m.id
            headers.update({
                "x-dead-letter-consumer": self.consumer.name,
                "x-dead-letter-reason": mask_secrets(f"{type(o.error).__name__}: {o.error}")[:1000],
                "x-original-topic": m.topic,
                "x-original-partition": str(m.partition),
                "x-original-offset": str(m.offset),
            })
            try:
                self._producer.produce(self.dead_letter_topic, value=m.payload, key=m.key,
                                       headers=list(headers.items()))
            except (KafkaException, BufferError) as exc:
                log.error("consumer %s: dead letter not sent to %s (it is in the dead-letter table): %s",
                          self.consumer.name, self.dead_letter_topic, mask_secrets(exc))
        left = self._producer.flush(10)
        if left:
            log.error("consumer %s: %d dead letter(s) not confirmed by %s (they are in the dead-letter table)",
                      self.consumer.name, left, self.dead_letter_topic)

    def lag(self, timeout: float = 2.0) -> dict[tuple[str, int], int] | None:
        """Per assigned partition: high watermark minus committed offset (call on the runner's thread).

        ``None`` when not consuming; a partition with no committed offset counts from its low watermark.
        """
        kc = self._kc
        if kc is None:
            return None
        tps = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        if not tps:
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in kc.committed(tps, timeout=timeout):
            low, high = kc.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout,
                                                 cached=False)
            offset = tp.offset if tp.offset >= 0 else low
            out[(tp.topic, tp.partition)] = max(0, int(high) - int(offset))
        return out


def _tps(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
