"""Run an async dedup consumer on Kafka under asyncio (confluent-kafka's ``confluent_kafka.aio.AIOConsumer``).

The same semantics as :class:`~outbox.transports.kafka.runner.KafkaRunner`, and the same bookkeeping
(:mod:`outbox.transports.kafka._lanes`): offsets are committed by hand, only after the batch's
database transaction committed; a RETRY pauses and rewinds its partition (later messages of that
partition are SKIPPED, other partitions flow); rebalances happen inside ``consume()``, between
batches, so nothing is in flight when partitions are revoked; ``stop()`` (SIGTERM) finishes the
batch in hand, commits and closes.

Why confluent-kafka's asyncio client and not aiokafka: it ships with the confluent-kafka we already
require (no new dependency), it is librdkafka underneath (the same protocol support, settings and
security options as the relay and the threaded runner), and on the tansu broker its rebalance
callbacks (``on_assign``/``on_revoke``/``on_lost``, run as coroutines on the loop), exact-offset
commits and ``pause``/``seek``/``resume`` behave as the threaded client's. aiokafka (0.14) passed the
same probe, but its group coordinator runs as a background task, so a revoke can arrive in the
middle of a batch; here the callbacks fire only inside ``consume()``, between batches, as in the
threaded runner. Each call runs in a small thread pool, so the event loop never blocks on the broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from consumers._runner import AsyncRunnerCore
from consumers.base import Outcome
from outbox._redact import mask_secrets
from outbox.errors import BrokerUnavailable
from outbox.incoming import IncomingMessage
from outbox.transports.base import Codec

from ._lanes import KafkaSetup, partition_lag

__all__ = ["AsyncKafkaRunner"]

log = logging.getLogger("consumers.kafka")


class AsyncKafkaRunner(KafkaSetup, AsyncRunnerCore):
    """Consume ``topics`` as group ``group_id`` and feed batches to an async ``consumer``; ``await run()``.

    ``engine`` is a SQLAlchemy ``AsyncEngine``; the other arguments are those of :class:`KafkaRunner`
    (``batch_size`` is the most messages in flight).
    """

    def __init__(
        self,
        consumer: Any,
        *,
        engine: Any,
        bootstrap_servers: str,
        topics: Sequence[str] | str,
        group_id: str,
        config: Mapping[str, Any] | None = None,
        batch_size: int = 500,
        batch_timeout: float = 0.5,
        dead_letter_topic: str | None = None,
        requeue_interval: float | None = 30.0,
        codec: Codec | str | None = None,
    ) -> None:
        super().__init__(consumer, engine=engine, batch_size=batch_size, batch_timeout=batch_timeout,
                         requeue_interval=requeue_interval)
        self.setup_kafka(bootstrap_servers=bootstrap_servers, topics=topics, group_id=group_id, config=config,
                         dead_letter_topic=dead_letter_topic, codec=codec)
        self._kc: Any = None

    # ------------------------------------------------------------------ rebalance callbacks (on the loop)
    async def _on_assign(self, kc: Any, partitions: list[TopicPartition]) -> None:
        self.partitions_assigned(partitions)

    async def _on_revoke(self, kc: Any, partitions: list[TopicPartition]) -> None:
        self.partitions_revoked(partitions)

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Consume until :meth:`stop`; the batch in hand is finished (DB commit, offset commit) first."""
        from confluent_kafka.aio import AIOConsumer

        self._started()
        kc = self._kc = AIOConsumer({**self.config, "logger": log}, max_workers=2)
        try:
            await kc.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                               on_lost=self._on_revoke)
            log.info("consumer %s: consuming %s as group %s (asyncio)", self.consumer.name, ", ".join(self.topics),
                     self.group_id)
            while not self.stopping:
                await self._resume_due(kc)
                await self.maybe_process_requeued()
                batch = await self._poll(kc)
                if not batch:
                    continue
                outcomes = await self.process(batch)
                if outcomes is None:
                    break
                await self._commit(kc, outcomes)
                await self._schedule_retries(kc, outcomes)
                if self.dead_letters is not None:
                    await asyncio.to_thread(self.dead_letters.send, outcomes)
        finally:
            self._kc = None
            try:
                await kc.close()
            except (KafkaException, RuntimeError) as exc:  # pragma: no cover - best effort
                log.warning("consumer %s: close failed: %s", self.consumer.name, mask_secrets(exc))
            if self.dead_letters is not None:
                await asyncio.to_thread(self.dead_letters.close)
            log.info("consumer %s: stopped (%s)", self.consumer.name, self.stats)

    async def lag(self, timeout: float = 2.0) -> dict[tuple[str, int], int] | None:
        """Per assigned partition: high watermark minus committed offset, as the threaded runner's
        :meth:`~outbox.transports.kafka.runner.KafkaRunner.lag`; the blocking client calls run in the
        AIOConsumer's worker threads, so the loop goes on meanwhile. Awaited between batches (by the
        metrics observer), never while ``consume()`` or ``close()`` is in flight. ``None`` when not consuming."""
        kc = self._kc
        if kc is None:
            return None
        tps = self.lag_partitions()
        if not tps:
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in await kc.committed(tps, timeout=timeout):
            low, high = await kc.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout,
                                                       cached=False)
            out[(tp.topic, tp.partition)] = partition_lag(tp.offset, low, high)
        return out

    async def _poll(self, kc: Any) -> list[IncomingMessage]:
        try:
            raw = await kc.consume(num_messages=self.batch_size, timeout=self.batch_timeout)
        except KafkaException as exc:
            raise BrokerUnavailable(mask_secrets(f"Kafka consume failed: {exc}")) from None
        return self.lanes.batch(raw, self.codec, self.group_id, self.consumer.name)

    async def _commit(self, kc: Any, outcomes: Sequence[Outcome]) -> None:
        offsets = [TopicPartition(t, p, off) for t, p, off in self.lanes.commit_offsets(outcomes)]
        if not offsets:
            return
        try:
            await kc.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("consumer %s: offset commit failed (messages will be redelivered as no-ops): %s",
                        self.consumer.name, mask_secrets(exc))

    async def _schedule_retries(self, kc: Any, outcomes: Sequence[Outcome]) -> None:
        for t, p, offset in self.lanes.schedule_retries(outcomes):
            part = TopicPartition(t, p, offset)
            try:
                await kc.pause([part])
                self.lanes.paused.add((t, p))
                await kc.seek(part)
            except KafkaException as exc:
                log.warning("consumer %s: cannot rewind %s[%d] for a retry: %s", self.consumer.name, t, p,
                            mask_secrets(exc))

    async def _resume_due(self, kc: Any) -> None:
        for t, p in self.lanes.due():
            try:
                await kc.resume([TopicPartition(t, p)])
            except KafkaException as exc:  # pragma: no cover - revoked meanwhile
                log.warning("consumer %s: cannot resume %s[%d]: %s", self.consumer.name, t, p, mask_secrets(exc))
