"""Run a dedup consumer on RabbitMQ (pika).

Messages are acknowledged by hand, only after the batch's database transaction committed: a
crash or a lost connection in between makes RabbitMQ redeliver them, and their ids are already in
the processed table, so they are no-ops.

A failing message is held (not acked) and tried again after a backoff while the others keep
flowing; after ``max_attempts`` tries it is written to the dead-letter table and then rejected
without requeue, so RabbitMQ routes it to the queue's dead-letter exchange if it has one (see
:func:`declare_queue`). The connection is re-established after it is lost (tenacity backoff).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions
import sqlalchemy as sa
import tenacity
from pika.adapters.blocking_connection import BlockingChannel

from consumers._runner import RunnerCore, check_str
from consumers.base import DedupConsumer, Outcome, backoff
from outbox._redact import mask_secrets
from outbox.errors import BrokerUnavailable, ConfigurationError
from outbox.incoming import IncomingMessage
from outbox.transports.base import Codec

from ._book import RabbitMQSetup

__all__ = ["RabbitMQRunner", "declare_queue"]

log = logging.getLogger("consumers.rabbitmq")

_CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError,
                      pika.exceptions.ConnectionWrongStateError, pika.exceptions.ChannelWrongStateError)


def _params(url: str) -> pika.URLParameters:
    try:
        return pika.URLParameters(url)
    except Exception as exc:
        raise ConfigurationError(f"bad RabbitMQ URL {mask_secrets(url)!r}: {mask_secrets(exc)}") from None


class RabbitMQRunner(RabbitMQSetup, RunnerCore):
    """Consume ``queue`` at ``url`` and feed batches to ``consumer``.

    ``prefetch`` (default ``2 * batch_size``) bounds the unacknowledged messages in hand, held
    retries included; it must be at least ``batch_size``.
    """

    def __init__(
        self,
        consumer: DedupConsumer,
        *,
        engine: sa.Engine,
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
                            reconnect_max_wait=reconnect_max_wait, raw_message_id=_raw_message_id)
        self._parameters = _params(url)
        self._conn: pika.BlockingConnection | None = None
        self._chan: BlockingChannel | None = None

    # ------------------------------------------------------------------ connection
    def _connect(self) -> bool:
        stop = tenacity.stop_never if self.reconnect_max_wait is None else tenacity.stop_after_delay(
            self.reconnect_max_wait)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_CONNECTION_ERRORS),
            wait=backoff(0.2, 10.0, 0.3),
            stop=stop | tenacity.stop_when_event_set(self._stop),
            sleep=lambda s: self._stop.wait(s) and None,  # type: ignore[func-returns-value]
            before_sleep=lambda rs: log.warning(
                "consumer %s: cannot connect to RabbitMQ (%s), retrying", self.consumer.name,
                mask_secrets(rs.outcome.exception() if rs.outcome else "?")),
            reraise=True,
        )
        try:
            retrying(self._open)
        except _CONNECTION_ERRORS as exc:
            if self.stopping:
                return False
            raise BrokerUnavailable(mask_secrets(f"cannot connect to RabbitMQ at {self.url}: {exc!r}")) from None
        return not self.stopping

    def _open(self) -> None:
        if self.stopping:
            return
        conn = pika.BlockingConnection(self._parameters)
        try:
            chan = conn.channel()
            chan.basic_qos(prefetch_count=self.prefetch)
            chan.basic_consume(self.queue, on_message_callback=self._on_message, auto_ack=False)
        except BaseException:
            _close_quietly(conn)
            raise
        self._conn, self._chan = conn, chan
        self.connections += 1
        log.info("consumer %s: consuming queue %s (%s)", self.consumer.name, self.queue, mask_secrets(self.url))

    def _drop_connection(self) -> None:
        conn, self._conn, self._chan = self._conn, None, None
        self.deliveries.clear()  # unacked: RabbitMQ redelivers them
        if conn is not None:
            _close_quietly(conn)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Consume until :meth:`stop`; the batch in hand is finished (DB commit, ack) first."""
        try:
            while not self.stopping:
                if self._conn is None and not self._connect():
                    break
                try:
                    self._step()
                except _CONNECTION_ERRORS as exc:
                    log.warning("consumer %s: RabbitMQ connection lost (%s); reconnecting", self.consumer.name,
                                mask_secrets(repr(exc)))
                    self._drop_connection()
        finally:
            self._drop_connection()
            log.info("consumer %s: stopped (%s)", self.consumer.name, self.stats)

    def _on_message(self, ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        self.deliveries.received((method, props, body))

    def _step(self) -> None:
        conn = self._conn
        assert conn is not None
        deadline = time.monotonic() + self.batch_timeout
        while len(self.deliveries.buffer) < self.batch_size and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn.process_data_events(time_limit=min(remaining, 0.2))
        batch = self.deliveries.take(self.batch_size)
        if not batch:
            self.maybe_process_requeued()
            return
        outcomes = self.process(batch)
        if outcomes is None:
            self.deliveries.hold(batch)  # not committed: left unacked for redelivery
            return
        self._settle(outcomes)
        self.maybe_process_requeued()

    def queue_depth(self) -> int | None:
        """Messages ready in the queue (a passive declare on the runner's own channel; call on its
        thread), or ``None`` when not connected."""
        chan = self._chan
        if chan is None or not chan.is_open:
            return None
        return int(chan.queue_declare(self.queue, passive=True).method.message_count)

    def _settle(self, outcomes: Sequence[Outcome]) -> None:
        chan = self._chan
        assert chan is not None
        plan = self.deliveries.settle(outcomes)
        if plan.ack_upto is not None:
            chan.basic_ack(delivery_tag=plan.ack_upto, multiple=True)
        else:
            for m in plan.acks:
                chan.basic_ack(delivery_tag=int(m.delivery_tag or 0))
        for m in plan.rejects:
            chan.basic_reject(delivery_tag=int(m.delivery_tag or 0), requeue=False)


def _raw_message_id(m: IncomingMessage) -> Any:
    return m.raw[1].message_id if isinstance(m.raw, tuple) else None


def _close_quietly(conn: pika.BlockingConnection) -> None:
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # closing a broken connection
        pass


def declare_queue(
    url: str,
    queue: str,
    *,
    exchange: str,
    routing_key: str = "#",
    exchange_type: str = "topic",
    dead_letter_exchange: str | None = None,
    dead_letter_queue: str | None = None,
) -> None:
    """Declare (durable) ``exchange``, ``queue`` and the binding between them.

    With ``dead_letter_exchange``, the queue dead-letters rejected messages there (a fanout
    exchange, declared too); with ``dead_letter_queue`` as well, a queue bound to it keeps them.
    """
    for what, value in (("queue", queue), ("exchange", exchange), ("routing_key", routing_key)):
        check_str(what, value)
    args: dict[str, Any] = {}
    if dead_letter_exchange:
        args["x-dead-letter-exchange"] = dead_letter_exchange
    conn = pika.BlockingConnection(_params(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange, exchange_type=exchange_type, durable=True)
        if dead_letter_exchange:
            ch.exchange_declare(dead_letter_exchange, exchange_type="fanout", durable=True)
            if dead_letter_queue:
                ch.queue_declare(dead_letter_queue, durable=True)
                ch.queue_bind(dead_letter_queue, dead_letter_exchange)
        ch.queue_declare(queue, durable=True, arguments=args or None)
        ch.queue_bind(queue, exchange, routing_key=routing_key)
    finally:
        _close_quietly(conn)
