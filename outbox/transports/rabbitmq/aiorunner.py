"""Run an async dedup consumer on RabbitMQ under asyncio (aio-pika, the optional extra ``rabbitmq-async``).

The same semantics as :class:`~outbox.transports.rabbitmq.runner.RabbitMQRunner`, and the same
bookkeeping (:mod:`outbox.transports.rabbitmq._book`): ``prefetch`` bounds the unacked deliveries
in hand; acks only after the batch's database transaction committed; a RETRY is held unacked and
tried again after its backoff while the others flow; DEAD (its dead-letter row committed) is
rejected without requeue, to the queue's dead-letter exchange; ``stop()`` (SIGTERM) finishes the
batch in hand, acks and closes.

Why aio-pika: it is the maintained asyncio AMQP 0-9-1 client (on aiormq), and its
``connect_robust`` reconnects and re-registers the consumer by itself. Deliveries of a lost channel
are dropped from hand, never acked (RabbitMQ redelivers them; their ids are in the processed table,
so they are no-ops); an ack that meets a closed channel is logged, not retried on the new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import tenacity

from consumers._runner import AsyncRunnerCore
from consumers.base import Outcome, backoff
from outbox._redact import mask_secrets
from outbox.errors import BrokerUnavailable, ConfigurationError
from outbox.transports.base import Codec

from ._book import RabbitMQSetup

__all__ = ["AsyncRabbitMQRunner"]

log = logging.getLogger("consumers.rabbitmq")


def _aio_pika() -> Any:
    try:
        import aio_pika
    except ImportError:
        raise ConfigurationError("the asyncio RabbitMQ runner needs aio-pika: pip install 'outboxkit[rabbitmq-async]' "
                                 "(or pip install aio-pika)") from None
    return aio_pika


class AsyncRabbitMQRunner(RabbitMQSetup, AsyncRunnerCore):
    """Consume ``queue`` at ``url`` and feed batches to an async ``consumer``; ``await run()``.

    ``engine`` is a SQLAlchemy ``AsyncEngine``; the other arguments are those of :class:`RabbitMQRunner`.
    """

    def __init__(
        self,
        consumer: Any,
        *,
        engine: Any,
        url: str,
        queue: str,
        prefetch: int | None = None,
        batch_size: int = 100,
        batch_timeout: float = 0.5,
        requeue_interval: float | None = 30.0,
        reconnect_max_wait: float | None = None,
        codec: Codec | str | None = None,
    ) -> None:
        super().__init__(consumer, engine=engine, batch_size=batch_size, batch_timeout=batch_timeout,
                         requeue_interval=requeue_interval)
        self.setup_rabbitmq(url=url, queue=queue, codec=codec, prefetch=prefetch,
                            reconnect_max_wait=reconnect_max_wait,
                            raw_message_id=lambda m: getattr(m.raw, "message_id", None))
        self._pika = _aio_pika()
        self._conn: Any = None
        self._queue: Any = None  # the consumed queue (aio-pika's robust queue: restored on reconnect)
        self._arrived: asyncio.Event | None = None

    # ------------------------------------------------------------------ connection
    def _connect_errors(self) -> tuple[type[BaseException], ...]:
        return (self._pika.exceptions.AMQPError, ConnectionError, OSError, asyncio.TimeoutError)

    async def _connect(self) -> bool:
        stop = tenacity.stop_never if self.reconnect_max_wait is None else tenacity.stop_after_delay(
            self.reconnect_max_wait)
        errors = self._connect_errors()
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(errors),
            wait=backoff(0.2, 10.0, 0.3),
            stop=stop | (lambda rs: self.stopping),
            sleep=self.wait_stop,
            before_sleep=lambda rs: log.warning(
                "consumer %s: cannot connect to RabbitMQ (%s), retrying", self.consumer.name,
                mask_secrets(rs.outcome.exception() if rs.outcome else "?")),
            reraise=True,
        )
        try:
            await retrying(self._open)
        except errors as exc:
            if self.stopping:
                return False
            raise BrokerUnavailable(mask_secrets(f"cannot connect to RabbitMQ at {self.url}: {exc!r}")) from None
        return not self.stopping

    async def _open(self) -> None:
        if self.stopping:
            return
        conn = await self._pika.connect_robust(self.url, reconnect_interval=1)
        try:
            chan = await conn.channel()
            await chan.set_qos(prefetch_count=self.prefetch)
            queue = await chan.get_queue(self.queue, ensure=True)
            await queue.consume(self._on_message, no_ack=False)
            self._queue = queue
        except BaseException:
            await _close_quietly(conn)
            raise
        conn.reconnect_callbacks.add(self._on_reconnect)
        conn.close_callbacks.add(self._on_lost)
        self._conn = conn
        self.connections += 1
        log.info("consumer %s: consuming queue %s (%s, asyncio)", self.consumer.name, self.queue,
                 mask_secrets(self.url))

    def _on_lost(self, _sender: Any, exc: BaseException | None = None) -> None:
        if exc is not None and not self.stopping:
            log.warning("consumer %s: RabbitMQ connection lost (%s); reconnecting", self.consumer.name,
                        mask_secrets(repr(exc)))
        self.deliveries.clear()  # unacked: RabbitMQ redelivers them

    def _on_reconnect(self, _sender: Any, *args: Any) -> None:
        # Not a place to drop deliveries: aio-pika calls this after the channel and its consumer are
        # restored, so the new channel's deliveries may be in hand already (the lost one's went in _on_lost).
        self.connections += 1
        log.info("consumer %s: reconnected to RabbitMQ", self.consumer.name)

    async def queue_depth(self, timeout: float = 5.0) -> int | None:
        """Messages ready in the queue, as the threaded runner's
        :meth:`~outbox.transports.rabbitmq.runner.RabbitMQRunner.queue_depth`: a passive declare on the
        consuming channel, awaited (the loop goes on meanwhile); ``None`` when not connected."""
        conn, queue = self._conn, self._queue
        if conn is None or queue is None or conn.is_closed:
            return None
        ok = await queue.declare(timeout=timeout)  # passive, as get_queue made it
        return int(ok.message_count)

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Consume until :meth:`stop`; the batch in hand is finished (DB commit, ack) first."""
        self._started()
        self._arrived = asyncio.Event()
        try:
            if await self._connect():
                while not self.stopping:
                    await self._step()
        finally:
            conn, self._conn, self._queue = self._conn, None, None
            self.deliveries.clear()
            if conn is not None:
                await _close_quietly(conn)
            log.info("consumer %s: stopped (%s)", self.consumer.name, self.stats)

    async def _on_message(self, message: Any) -> None:
        self.deliveries.received(message)
        if len(self.deliveries.buffer) >= self.batch_size and self._arrived is not None:
            self._arrived.set()

    async def _step(self) -> None:
        arrived = self._arrived
        assert arrived is not None
        deadline = time.monotonic() + self.batch_timeout
        while len(self.deliveries.buffer) < self.batch_size and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), timeout=min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass
        batch = self.deliveries.take(self.batch_size)
        if batch:
            outcomes = await self.process(batch)
            if outcomes is None:
                self.deliveries.hold(batch)  # not committed: left unacked for redelivery
                return
            await self._settle(outcomes)
        await self.maybe_process_requeued()

    async def _settle(self, outcomes: Sequence[Outcome]) -> None:
        plan = self.deliveries.settle(outcomes)
        try:
            if plan.ack_upto is not None:
                last = next(m for m in plan.acks if int(m.delivery_tag or 0) == plan.ack_upto)
                await last.raw.ack(multiple=True)
            else:
                for m in plan.acks:
                    await m.raw.ack()
            for m in plan.rejects:
                await m.raw.reject(requeue=False)
        except (*self._connect_errors(), self._pika.exceptions.ChannelInvalidStateError) as exc:
            # committed in the database: a redelivery is a no-op
            log.warning("consumer %s: ack on a lost channel (the messages will be redelivered as no-ops): %s",
                        self.consumer.name, mask_secrets(repr(exc)))


async def _close_quietly(conn: Any) -> None:
    try:
        await conn.close()
    except Exception:  # closing a broken connection
        pass
