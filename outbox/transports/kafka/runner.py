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
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaException, TopicPartition

from consumers._runner import RunnerCore
from consumers.base import DedupConsumer, Outcome
from outbox._redact import mask_secrets
from outbox.errors import BrokerUnavailable
from outbox.incoming import IncomingMessage
from outbox.transports.base import Codec

from ._lanes import KafkaSetup, partition_lag

__all__ = ["KafkaRunner"]

log = logging.getLogger("consumers.kafka")


class KafkaRunner(KafkaSetup, RunnerCore):
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
        self.setup_kafka(bootstrap_servers=bootstrap_servers, topics=topics, group_id=group_id, config=config,
                         dead_letter_topic=dead_letter_topic, codec=codec)
        self.commit_timeout = commit_timeout
        self._kc: Consumer | None = None

    # ------------------------------------------------------------------ rebalance callbacks
    def _on_assign(self, kc: Consumer, partitions: list[TopicPartition]) -> None:
        self.partitions_assigned(partitions)

    def _on_revoke(self, kc: Consumer, partitions: list[TopicPartition]) -> None:
        self.partitions_revoked(partitions)

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
                if self.dead_letters is not None:
                    self.dead_letters.send(outcomes)
        finally:
            self._kc = None
            try:
                kc.close()
            except (KafkaException, RuntimeError) as exc:  # pragma: no cover - best effort
                log.warning("consumer %s: close failed: %s", self.consumer.name, mask_secrets(exc))
            if self.dead_letters is not None:
                self.dead_letters.close()
            log.info("consumer %s: stopped (%s)", self.consumer.name, self.stats)

    def _poll(self, kc: Consumer) -> list[IncomingMessage]:
        try:
            raw = kc.consume(num_messages=self.batch_size, timeout=self.batch_timeout)
        except KafkaException as exc:
            raise BrokerUnavailable(mask_secrets(f"Kafka consume failed: {exc}")) from None
        return self.lanes.batch(raw, self.codec, self.group_id, self.consumer.name)

    def _commit(self, kc: Consumer, outcomes: Sequence[Outcome]) -> None:
        """Commit, per partition, past the leading run of settled messages."""
        offsets = [TopicPartition(t, p, off) for t, p, off in self.lanes.commit_offsets(outcomes)]
        if not offsets:
            return
        try:
            kc.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The database already has these messages: a redelivery is a no-op.
            log.warning("consumer %s: offset commit failed (messages will be redelivered as no-ops): %s",
                        self.consumer.name, mask_secrets(exc))

    def _schedule_retries(self, kc: Consumer, outcomes: Sequence[Outcome]) -> None:
        for t, p, offset in self.lanes.schedule_retries(outcomes):
            part = TopicPartition(t, p, offset)
            try:
                kc.pause([part])
                self.lanes.paused.add((t, p))
                kc.seek(part)
            except KafkaException as exc:
                log.warning("consumer %s: cannot rewind %s[%d] for a retry: %s", self.consumer.name, t, p,
                            mask_secrets(exc))

    def _resume_due(self, kc: Consumer) -> None:
        for tp in self.lanes.due():
            try:
                kc.resume([TopicPartition(tp[0], tp[1])])
            except KafkaException as exc:  # pragma: no cover - revoked meanwhile
                log.warning("consumer %s: cannot resume %s[%d]: %s", self.consumer.name, tp[0], tp[1],
                            mask_secrets(exc))

    def lag(self, timeout: float = 2.0) -> dict[tuple[str, int], int] | None:
        """Per assigned partition: high watermark minus committed offset (call on the runner's thread).

        ``None`` when not consuming; a partition with no committed offset counts from its low watermark.
        """
        kc = self._kc
        if kc is None:
            return None
        tps = self.lag_partitions()
        if not tps:
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in kc.committed(tps, timeout=timeout):
            low, high = kc.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout,
                                                 cached=False)
            out[(tp.topic, tp.partition)] = partition_lag(tp.offset, low, high)
        return out
