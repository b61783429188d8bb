"""RabbitMQ adapter: pika with publisher confirms over a window of unconfirmed messages.

Every record is published to the exchange named by its topic, with its key as routing key
(``None`` -> ``""``), ``mandatory=True`` and the properties ``delivery_mode=2`` (persistent),
``message_id``, ``content_type``, ``timestamp`` and ``headers`` (the record's headers plus
``message-id``).

Throughput comes from not waiting for each confirm: up to ``confirm_window`` messages are in
flight, and RabbitMQ's (often ``multiple``) acks settle them. The adapter drives a
``pika.SelectConnection`` I/O loop itself (``IOLoop.poll`` / ``process_timeouts``) on the
calling thread, so there is no background thread and no shared state. Before each round of the
loop the frames pika buffered since the last one (three per message) are joined into writes of up
to 256 KiB, so a window of messages costs a few ``send()`` calls instead of three per message.

Outcomes:

- ``DELIVERED``: ``basic.ack`` and no ``basic.return``.
- ``FAILED``: returned as unroutable (``unroutable: NO_ROUTE (exchange=..., routing_key=...): no queue
  is bound ...``, with what to do: bind a queue or set an alternate exchange, then requeue),
  the exchange does not exist (the broker's ``404 NOT_FOUND`` text) or may not be used
  (``403 ACCESS_REFUSED``), the topic is empty (``empty exchange name: ...``; the default exchange
  only with ``allow_default_exchange=True``), or the payload is over ``max_message_bytes``.
- ``RETRY``: ``basic.nack``, connection lost, no confirm within the ``publish`` timeout.

Connections: between batches the relay calls :meth:`RabbitMQPublisher.idle`, which services
heartbeats (and reopens a connection the broker closed), so an idle relay keeps its connection. A
connection found dead when publishing (reset, missed heartbeats, closed by the broker) is reopened
and the batch goes on; ``close()`` after a lost connection is quiet. pika's own log records are
demoted to DEBUG: the adapter logs a warning naming the cause instead of pika's tracebacks.

Exchanges are checked (passive declare) the first time they are used, or declared (durable, of
``exchange_type``) when ``declare_exchanges=True``. When a publish closes the channel (for
instance an exchange deleted since it was checked), the messages for that exchange fail, the
channel is reopened, and the unconfirmed messages for other exchanges are sent again in order
(before the rest of the batch), so per-key order holds; the broker may then hold duplicates,
which consumers drop by message id.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from ..._redact import mask_secrets
from ...errors import BrokerUnavailable, ConfigurationError
from ...message import OutboxRecord
from ..base import Codec, Outcome, PublishResult, delivered
from ..codecs import get_codec

__all__ = ["RabbitMQPublisher"]

logger = logging.getLogger("outbox.brokers.rabbitmq")  # the name users configure: kept across the move

_EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
# "NOT_FOUND - no exchange 'x' in vhost '/'", "ACCESS_REFUSED - access to exchange 'x' in vhost ..."
_EXCHANGE_IN_TEXT = re.compile(r"exchange '((?:[^']|'(?! in vhost))*)' in vhost")
_MAX_REOPENS = 20
#: Buffered frames are joined into socket writes of up to this many bytes (see _coalesce_writes).
_JOIN_BYTES = 256 * 1024
#: What a dead connection or channel raises from pika calls (reset, heartbeat missed, closed).
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    OSError,
)
_EMPTY_EXCHANGE = (
    "empty exchange name: the message would go through the default exchange straight to the queue "
    "named by its key; give it a topic (the exchange), or set allow_default_exchange=True if that is meant"
)


def _noop() -> None:
    return None


def _coalesce_writes(conn: pika.SelectConnection) -> None:
    """Join the frames pika has buffered for the socket into chunks of up to :data:`_JOIN_BYTES`.

    pika writes each buffered frame with its own ``send()``: three system calls per message
    (method, content header, body), most of a small message's cost. Joined, the frames of the
    messages published since the last poll go out in one call (a frame over the limit stays as it
    is, and a chunk stays small enough that re-queuing the rest of a partial send copies little).
    This reads pika's transport buffer (``_transport._tx_buffers``, a deque of bytes in pika 1.3);
    where that is not there, nothing is joined and pika sends as before.
    """
    buffers = getattr(getattr(conn, "_transport", None), "_tx_buffers", None)
    if not isinstance(buffers, collections.deque) or len(buffers) < 2:
        return
    chunks: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for frame in buffers:
        if group and size + len(frame) > _JOIN_BYTES:
            chunks.append(b"".join(group))
            group, size = [], 0
        group.append(frame)
        size += len(frame)
    chunks.append(b"".join(group))
    buffers.clear()
    buffers.extend(chunks)


def _bool_setting(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ConfigurationError(f"{name} must be a bool, got {value!r}")


def _int_setting(name: str, value: object, low: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _seconds_setting(name: str, value: object) -> float:
    try:
        seconds = float(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
    except ValueError:
        seconds = None
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


class _PikaToDebug(logging.Filter):
    """pika logs every connection event, a lost connection at ERROR with the caller's stack. This
    adapter reports what matters itself (a warning naming the cause, reconnecting, no traceback),
    so pika's own records are demoted to DEBUG: shown with ``--log-level DEBUG`` only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_PIKA_FILTER = _PikaToDebug()


def _pika_logs_to_debug() -> None:
    """Put the filter on every pika logger (filters do not apply to records of child loggers)."""
    for name, item in list(logging.root.manager.loggerDict.items()):
        if (name == "pika" or name.startswith("pika.")) and isinstance(item, logging.Logger):
            if _PIKA_FILTER not in item.filters:
                item.addFilter(_PIKA_FILTER)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown reason"
    if isinstance(exc, pika.exceptions.ChannelClosed | pika.exceptions.ConnectionClosed):
        return mask_secrets(f"{exc.reply_code} {exc.reply_text}")
    if isinstance(exc, pika.exceptions.AMQPError):
        return mask_secrets(repr(exc))  # pika's repr carries the cause (refused, auth, ...)
    return mask_secrets(f"{type(exc).__name__}: {exc}")


@dataclass
class _Batch:
    records: Sequence[OutboxRecord]
    results: list[PublishResult | None]
    returned: dict[int, str] = field(default_factory=dict)
    inflight: int = 0
    """Messages of this batch awaiting a confirm."""
    done: bool = False


@dataclass
class _Entry:
    batch: _Batch
    index: int
    message_id: str
    size: int


@dataclass
class _Send:
    """The state of one ``publish`` call."""

    batch: _Batch
    deadline: float
    todo: collections.deque[int]
    """Indexes of the records still to send, in order."""
    unsent_reason: str
    """The reason given to records left without a verdict."""
    timeout: float
    blocked: dict[str, tuple[Outcome, str]] = field(default_factory=dict)
    """Exchange -> the outcome of every message for it (missing or refused)."""
    held: dict[str, int] = field(default_factory=dict)
    """Keys with a message of this batch that failed before being sent -> its id: their later
    messages are held back (RETRY, held=True), so per-key order survives a failure mid-batch."""
    reopens: int = 0
    reconnects: int = 0
    since_poll: int = 0
    link_down: bool = False
    """The batch ended because the connection was lost and could not be reopened."""
    ended: bool = False
    """A step ended the batch: what has no verdict yet comes back RETRY."""

    def settle(self, i: int, outcome: Outcome, reason: str | None) -> None:
        rec = self.batch.records[i]
        self.batch.results[i] = PublishResult(rec.id, outcome, reason)
        if rec.key is not None:
            self.held.setdefault(rec.key, rec.id)

    def again(self, entries: list[_Entry]) -> None:
        """Send these unconfirmed entries again, first and in order."""
        self.todo.extendleft(reversed([e.index for e in entries]))


class RabbitMQPublisher:
    """Publish outbox records to RabbitMQ exchanges with windowed publisher confirms.

    :param url: an AMQP URL, ``amqp://user:password@host:5672/vhost`` (``amqps://`` for TLS).
    :param exchange_type: the type used when ``declare_exchanges`` is on.
    :param declare_exchanges: declare missing exchanges (durable) instead of failing their messages.
    :param confirm_window: how many messages may await a confirm at once.
    :param mandatory: have unroutable messages returned (and reported FAILED) instead of dropped.
    :param heartbeat: AMQP heartbeat in seconds (0 turns heartbeats off).
    :param connection_attempts: how many times to try to (re)connect before giving up.
    :param connect_timeout: seconds one connection attempt (and a channel open / exchange check) may take.
    :param max_message_bytes: bigger payloads fail without being sent (RabbitMQ's own
        ``max_message_size`` defaults to 128 MiB and closes the channel when exceeded).
    :param max_unconfirmed_bytes: bound on the payload bytes awaiting confirms.
    :param connection_name: shown by RabbitMQ (management UI, ``rabbitmqctl list_connections``).
    :param allow_default_exchange: let a record with an empty topic go through the default
        exchange to the queue named by its key. Off by default: an empty topic is then a FAILED
        outcome (``empty exchange name: ...``), not a silent detour.
    """

    def __init__(
        self,
        *,
        url: str,
        exchange_type: str = "topic",
        declare_exchanges: bool = False,
        confirm_window: int = 1000,
        mandatory: bool = True,
        heartbeat: int = 60,
        connection_attempts: int = 3,
        connect_timeout: float = 10.0,
        max_message_bytes: int = 128 * 1024 * 1024,
        max_unconfirmed_bytes: int = 64 * 1024 * 1024,
        connection_name: str | None = "outbox-relay",
        allow_default_exchange: bool = False,
        codec: Codec | str | None = None,
    ) -> None:
        self.codec = get_codec(codec)
        if not isinstance(url, str) or not url.strip():
            raise ConfigurationError("url must be a non-empty AMQP URL string")
        if exchange_type not in _EXCHANGE_TYPES:
            raise ConfigurationError(
                f"exchange_type must be one of {', '.join(_EXCHANGE_TYPES)}, got {exchange_type!r}"
            )
        # Values may come as text from a config file or ``--broker-option KEY=VALUE``.
        declare_exchanges = _bool_setting("declare_exchanges", declare_exchanges)
        mandatory = _bool_setting("mandatory", mandatory)
        allow_default_exchange = _bool_setting("allow_default_exchange", allow_default_exchange)
        confirm_window = _int_setting("confirm_window", confirm_window, 1)
        heartbeat = _int_setting("heartbeat", heartbeat, 0)
        connection_attempts = _int_setting("connection_attempts", connection_attempts, 1)
        max_message_bytes = _int_setting("max_message_bytes", max_message_bytes, 1)
        max_unconfirmed_bytes = _int_setting("max_unconfirmed_bytes", max_unconfirmed_bytes, 1)
        connect_timeout = _seconds_setting("connect_timeout", connect_timeout)
        try:
            params = pika.URLParameters(url)
        except Exception as exc:
            raise ConfigurationError(
                f"url {mask_secrets(url)!r} is not a valid AMQP URL: {mask_secrets(exc)}"
            ) from None
        params.heartbeat = heartbeat
        params.connection_attempts = 1  # retries are ours (tenacity, with backoff and jitter)
        params.socket_timeout = float(connect_timeout)
        params.stack_timeout = float(connect_timeout) + 5.0
        if connection_name is not None:
            if not isinstance(connection_name, str):
                raise ConfigurationError(f"connection_name must be a str or None, got {connection_name!r}")
            params.client_properties = {**(params.client_properties or {}), "connection_name": connection_name}
        self._params = params
        self._safe_url = mask_secrets(url)
        self.exchange_type = exchange_type
        self.declare_exchanges = declare_exchanges
        self.confirm_window = confirm_window
        self.mandatory = mandatory
        self.allow_default_exchange = allow_default_exchange
        self.connection_attempts = connection_attempts
        self.connect_timeout = float(connect_timeout)
        self.max_message_bytes = max_message_bytes
        self.max_unconfirmed_bytes = max_unconfirmed_bytes

        self._conn: pika.SelectConnection | None = None
        self._conn_lost: BaseException | None = None
        self._chan: pika.channel.Channel | None = None
        self._chan_closed: BaseException | None = None
        self._next_tag = 0
        self._unconfirmed: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._unconfirmed_bytes = 0
        self._known_exchanges: set[str] = set()
        self._batch: _Batch | None = None
        _pika_logs_to_debug()

    # ------------------------------------------------------------------ I/O loop

    def _poll(self, deadline: float) -> None:
        """One round of the I/O loop: wait for I/O at most until ``deadline`` (or 1 s)."""
        conn = self._conn
        if conn is None:
            return
        ioloop = conn.ioloop
        try:
            _coalesce_writes(conn)
            timer = ioloop.call_later(max(0.0, min(deadline - time.monotonic(), 1.0)), _noop)
            try:
                ioloop.poll()
                ioloop.process_timeouts()
            finally:
                ioloop.remove_timeout(timer)
        except _LINK_ERRORS as exc:  # pika reports most losses through callbacks; these as exceptions
            if conn is self._conn and self._conn_lost is None:
                self._conn_lost = exc
        except ValueError as exc:
            # A connection reset between the TCP connect and pika's stream set-up (a load balancer
            # that accepts, then resets) surfaces as "Expected connected socket, but getpeername()
            # failed": a lost link like any other, not a reason to crash the relay.
            if "connected socket" not in str(exc):
                raise
            if conn is self._conn and self._conn_lost is None:
                self._conn_lost = exc

    def _run_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Drive the I/O loop until ``done()``, the connection drops or ``deadline``; return ``done()``."""
        while not done():
            if self._conn is None or self._conn_lost is not None or time.monotonic() >= deadline:
                return done()
            self._poll(deadline)
        return True

    # ------------------------------------------------------------------ connection & channel

    def _on_conn_closed(self, conn: pika.SelectConnection, reason: BaseException) -> None:
        if conn is self._conn:
            self._conn_lost = reason

    def _on_chan_closed(self, chan: pika.channel.Channel, reason: BaseException) -> None:
        if chan is self._chan:
            self._chan_closed = reason

    def _connect_once(self) -> None:
        state: dict[str, Any] = {}
        deadline = time.monotonic() + self.connect_timeout + 5.0

        def opened(_c: pika.SelectConnection) -> None:
            state["open"] = True

        def failed(_c: pika.SelectConnection, exc: BaseException) -> None:
            state["error"] = exc

        conn = pika.SelectConnection(
            self._params, on_open_callback=opened, on_open_error_callback=failed, on_close_callback=self._on_conn_closed
        )
        conn.ioloop.activate_poller()  # we drive the loop with poll() instead of start()
        self._conn, self._conn_lost = conn, None
        ok = self._run_until(lambda: bool(state), deadline)
        if not ok or "error" in state or self._conn_lost is not None:
            why = state.get("error") or self._conn_lost
            self._drop_connection()
            raise BrokerUnavailable(
                f"cannot connect to RabbitMQ at {self._safe_url}: "
                f"{_describe(why) if why is not None else f'no answer within {self.connect_timeout:g} s'}"
            )
        self._open_channel()

    def _connect(self) -> None:
        """Connect (with bounded retries, exponential backoff and jitter) and open a confirm channel."""
        self._drop_connection()
        retrying = Retrying(
            stop=stop_after_attempt(self.connection_attempts) | stop_after_delay(self.connect_timeout * 3),
            wait=wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.2),  # backoff + jitter
            retry=retry_if_exception_type(BrokerUnavailable),
            reraise=True,
        )
        try:
            retrying(self._connect_once)
        except RetryError as exc:  # pragma: no cover - reraise=True re-raises the last error
            raise BrokerUnavailable(f"cannot connect to RabbitMQ at {self._safe_url}") from exc

    def _open_channel(self) -> None:
        assert self._conn is not None
        state: dict[str, Any] = {}
        deadline = time.monotonic() + self.connect_timeout
        self._chan, self._chan_closed = None, None
        chan = self._conn.channel(on_open_callback=lambda ch: state.__setitem__("open", ch))
        self._chan = chan
        chan.add_on_close_callback(self._on_chan_closed)
        if not self._run_until(lambda: "open" in state or self._chan_closed is not None, deadline) or (
            self._chan_closed is not None
        ):
            why = self._chan_closed or self._conn_lost
            raise BrokerUnavailable(f"cannot open a RabbitMQ channel at {self._safe_url}: {_describe(why)}")
        chan.add_on_return_callback(self._on_return)
        chan.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _f: state.__setitem__("confirm", 1))
        if not self._run_until(lambda: "confirm" in state or self._chan_closed is not None, deadline) or (
            self._chan_closed is not None
        ):
            why = self._chan_closed or self._conn_lost
            raise BrokerUnavailable(f"cannot enable publisher confirms at {self._safe_url}: {_describe(why)}")
        self._next_tag = 0

    def _reopen_channel(self) -> None:
        """Open a new confirm channel; a failure counts as a lost connection (the caller reconnects)."""
        try:
            self._open_channel()
        except BrokerUnavailable as exc:
            if self._conn_lost is None:
                self._conn_lost = exc

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._chan = None
        self._forget_unconfirmed()
        if conn is None:
            return
        try:
            if conn.is_open:
                conn.close()
                deadline = time.monotonic() + 2.0
                while not conn.is_closed and time.monotonic() < deadline:
                    timer = conn.ioloop.call_later(0.2, _noop)
                    conn.ioloop.poll()
                    conn.ioloop.process_timeouts()
                    conn.ioloop.remove_timeout(timer)
        except Exception:  # the connection is going away either way
            logger.debug("error while dropping the RabbitMQ connection", exc_info=True)
        finally:
            try:
                conn.ioloop.close()
            except Exception:
                pass

    def _forget_unconfirmed(self) -> list[_Entry]:
        """Drop every unconfirmed entry; return those of the running batch (to send again)."""
        entries = [e for e in self._unconfirmed.values() if not e.batch.done]
        for e in entries:
            e.batch.inflight -= 1
        self._unconfirmed.clear()
        self._unconfirmed_bytes = 0
        return entries

    def start(self) -> None:
        """Connect and open a confirm channel (idempotent). Raises BrokerUnavailable if RabbitMQ cannot be reached."""
        if self._conn is not None and self._conn_lost is None and self._chan is not None and self._chan_closed is None:
            return
        if self._conn_lost is not None:
            logger.warning("RabbitMQ connection lost (%s); reconnecting", _describe(self._conn_lost))
        self._connect()

    # ------------------------------------------------------------------ broker callbacks

    def _on_return(self, chan: pika.channel.Channel, method: pika.spec.Basic.Return,
                   props: pika.spec.BasicProperties, _body: bytes) -> None:
        if chan is not self._chan:
            return
        for entry in self._unconfirmed.values():  # the return comes before the message's ack
            batch = entry.batch
            if entry.message_id == props.message_id and not batch.done and entry.index not in batch.returned:
                batch.returned[entry.index] = _unroutable(method.reply_text, method.exchange, method.routing_key)
                return

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        ack = isinstance(method, pika.spec.Basic.Ack)
        tag: int = method.delivery_tag
        if method.multiple:
            tags = []
            for t in self._unconfirmed:
                if t > tag:
                    break
                tags.append(t)
        else:
            tags = [tag] if tag in self._unconfirmed else []
        for t in tags:
            entry = self._unconfirmed.pop(t)
            self._unconfirmed_bytes -= entry.size
            batch = entry.batch
            if batch.done:
                continue
            batch.inflight -= 1
            rec = batch.records[entry.index]
            if not ack:
                batch.results[entry.index] = PublishResult(rec.id, Outcome.RETRY, "nacked by the broker")
            elif entry.index in batch.returned:
                batch.results[entry.index] = PublishResult(rec.id, Outcome.FAILED, batch.returned[entry.index])
            else:
                batch.results[entry.index] = delivered(rec.id)

    # ------------------------------------------------------------------ publishing

    def _check_exchange(self, exchange: str) -> tuple[Outcome, str] | None:
        """Passive-declare (or declare) ``exchange``; ``None`` when usable, else the outcome for its messages."""
        assert self._chan is not None
        state: dict[str, Any] = {}
        try:
            self._chan.exchange_declare(
                exchange=exchange,
                exchange_type=self.exchange_type,
                passive=not self.declare_exchanges,
                durable=True,
                callback=lambda _f: state.__setitem__("ok", 1),
            )
        except (pika.exceptions.AMQPError, ValueError, TypeError) as exc:
            return Outcome.FAILED, f"cannot check exchange {exchange!r}: {_describe(exc)}"
        deadline = time.monotonic() + self.connect_timeout
        self._run_until(lambda: "ok" in state or self._chan_closed is not None, deadline)
        if "ok" in state:
            self._known_exchanges.add(exchange)
            return None
        if self._chan_closed is not None:
            why = self._chan_closed
            if isinstance(why, pika.exceptions.ChannelClosedByBroker):
                verb = "declare" if self.declare_exchanges else "find"
                return Outcome.FAILED, f"cannot {verb} exchange {exchange!r}: {_describe(why)}"
            return Outcome.RETRY, f"exchange check interrupted: {_describe(why)}"
        if self._conn_lost is not None:
            return Outcome.RETRY, f"connection lost: {_describe(self._conn_lost)}"
        return Outcome.RETRY, f"no answer to the check of exchange {exchange!r} within {self.connect_timeout:g} s"

    def publish(self, records: Sequence[OutboxRecord], *, timeout: float = 30.0) -> list[PublishResult]:
        """Publish ``records`` and wait up to ``timeout`` s for their confirms.

        Sending is not cut short by ``timeout`` (only waiting is): with ``timeout=0`` everything is
        sent and reported RETRY unless already confirmed; ``flush()``/``close()`` then wait for the
        confirms, so the messages reach the broker. A connection found dead (reset, heartbeat
        missed, closed by the broker) is reopened and the batch goes on, in order.
        """
        return self.begin_publish(records, timeout=timeout)()

    def begin_publish(self, records: Sequence[OutboxRecord], *,
                      timeout: float = 30.0) -> Callable[[], list[PublishResult]]:
        """Send ``records`` now, as far as the confirm window lets; the function returned waits for
        their confirms and returns what :meth:`publish` returns.

        In between the caller may do other work (the relay claims its next batch) while RabbitMQ
        confirms; the confirms wait in the socket meanwhile. Call the function exactly once, before
        sending anything else on this publisher. ``timeout`` counts from this call.
        """
        if not records:
            return list
        if self._batch is not None:  # begun and never waited for (its caller gave the batch up)
            self._batch.done = True
            self._batch = None
        if self._conn is not None and self._conn_lost is None:
            self._poll(time.monotonic())  # notice a connection dropped while idle before sending
        self.start()
        batch = _Batch(records, [None] * len(records))
        send = _Send(batch, time.monotonic() + max(0.0, timeout), collections.deque(range(len(records))),
                     f"no publisher confirm within {timeout:g} s", timeout)
        self._batch = batch
        try:
            self._check_exchanges(send, dict.fromkeys(r.topic for r in records))
            while send.todo and not send.ended:
                send.ended = not self._step(send)
        except BaseException:
            self._end(batch)
            raise
        self._poll(time.monotonic())  # write out what is buffered before the caller turns away
        return lambda: self._complete(send)

    def _complete(self, send: _Send) -> list[PublishResult]:
        """Wait for the confirms of a batch :meth:`begin_publish` sent (recovering as :meth:`publish` says)."""
        batch = send.batch
        try:
            while (send.todo or batch.inflight) and not send.ended:
                send.ended = not self._step(send)
        finally:
            self._end(batch)
        out = [res if res is not None else PublishResult(rec.id, Outcome.RETRY, send.unsent_reason)
               for rec, res in zip(batch.records, batch.results, strict=True)]
        if send.link_down and all(r.outcome is Outcome.RETRY for r in out):
            # Nothing got through and RabbitMQ cannot be reached: the relay backs off as a whole
            # instead of counting an attempt against every row.
            raise BrokerUnavailable(f"RabbitMQ at {self._safe_url} is not reachable: {send.unsent_reason}")
        return out

    def _end(self, batch: _Batch) -> None:
        batch.done = True
        if self._batch is batch:
            self._batch = None

    def _check_exchanges(self, send: _Send, exchanges: Iterable[str]) -> None:
        """Check every new exchange up front, before anything of the batch is in flight."""
        for ex in exchanges:
            if self._conn_lost is not None or self._chan is None:
                return  # the loop reconnects; unchecked exchanges are checked there
            if ex == "" or ex in self._known_exchanges:
                continue  # the default exchange needs no check (and is refused per message unless allowed)
            problem = self._check_exchange(ex)
            if problem is not None:
                send.blocked[ex] = problem
                if self._conn_lost is not None:
                    return
                if self._chan_closed is not None:
                    send.reopens += 1
                    self._reopen_channel()

    def _step(self, send: _Send) -> bool:
        """One step of a batch: recover the connection or channel, wait for confirms, or send one
        message. ``False`` ends the batch (what has no verdict comes back RETRY)."""
        if self._conn_lost is not None or self._conn is None:
            return self._recover_connection(send)
        if self._chan_closed is not None:
            return self._recover_channel(send)
        if not send.todo:
            if time.monotonic() >= send.deadline:
                return False
            batch = send.batch
            self._run_until(lambda: not batch.inflight or self._chan_closed is not None, send.deadline)
            return True
        return self._send_next(send)

    def _recover_connection(self, send: _Send) -> bool:
        lost = self._conn_lost
        send.again(self._forget_unconfirmed())
        if send.reconnects >= 3 or time.monotonic() >= send.deadline:
            send.unsent_reason = f"connection lost: {_describe(lost)}"
            send.link_down = True
            self._drop_connection()
            return False
        send.reconnects += 1
        logger.warning("RabbitMQ connection lost (%s); reconnecting", _describe(lost))
        try:
            self._connect()
        except BrokerUnavailable as exc:
            send.unsent_reason = f"connection lost: {_describe(lost)}; reconnect failed: {exc}"
            send.link_down = True
            return False
        self._known_exchanges.clear()
        send.blocked = {k: v for k, v in send.blocked.items() if v[0] is Outcome.FAILED}
        return True

    def _recover_channel(self, send: _Send) -> bool:
        why = self._chan_closed
        m = _EXCHANGE_IN_TEXT.search(getattr(why, "reply_text", "") or "")
        culprit = m.group(1) if m and getattr(why, "reply_code", 0) in (403, 404) else None
        if culprit is None or send.reopens >= _MAX_REOPENS:
            send.unsent_reason = f"channel closed by the broker: {_describe(why)}"
            # Keep the channel usable for the next batch; end this one (order is kept).
            self._forget_unconfirmed()
            self._reopen_channel()
            return False
        self._known_exchanges.discard(culprit)
        send.blocked[culprit] = (Outcome.FAILED, f"publish to exchange {culprit!r} failed: {_describe(why)}")
        send.again(self._forget_unconfirmed())
        send.reopens += 1
        self._reopen_channel()
        return True

    def _send_next(self, send: _Send) -> bool:
        """Settle, check or publish the next record of ``send.todo``."""
        i = send.todo[0]
        rec = send.batch.records[i]
        if self._settled_unsent(send, i, rec):
            return True
        topic = rec.topic
        if topic and topic not in self._known_exchanges:
            self._check_new_exchange(send, topic)
            return True
        size = len(rec.payload)
        if size > self.max_message_bytes:
            send.todo.popleft()
            send.settle(i, Outcome.FAILED,
                        f"message size {size:,} bytes is over max_message_bytes {self.max_message_bytes:,}")
            return True
        unconfirmed = self._unconfirmed
        if len(unconfirmed) >= self.confirm_window or (
                unconfirmed and self._unconfirmed_bytes + size > self.max_unconfirmed_bytes):
            return self._wait_for_room(send)
        self._publish_one(send, i, rec)
        return True

    def _settled_unsent(self, send: _Send, i: int, rec: OutboxRecord) -> bool:
        """Settle a record that is not to be sent: held back behind its key's failed message, with an
        empty topic (unless the default exchange is allowed), or for an exchange known to fail.
        ``False`` if it is to be sent."""
        if rec.key is not None and rec.key in send.held:
            send.todo.popleft()
            why = f"held back: message {send.held[rec.key]} with the same key was not sent"
            send.batch.results[i] = PublishResult(rec.id, Outcome.RETRY, why, held=True)
            return True
        if not rec.topic and not self.allow_default_exchange:
            send.todo.popleft()
            send.settle(i, Outcome.FAILED, _EMPTY_EXCHANGE)
            return True
        if rec.topic in send.blocked:
            send.todo.popleft()
            send.settle(i, *send.blocked[rec.topic])
            return True
        return False

    def _check_new_exchange(self, send: _Send, topic: str) -> None:
        """Not checked yet (new since a reconnect): check now. A failed check closes the channel, so
        what is in flight is sent again, in order, on a new one."""
        problem = self._check_exchange(topic)
        if problem is not None:
            send.blocked[topic] = problem
            if self._chan_closed is not None and self._conn_lost is None:
                send.again(self._forget_unconfirmed())
                send.reopens += 1
                self._reopen_channel()

    def _wait_for_room(self, send: _Send) -> bool:
        """The confirm window (or its byte bound) is full: wait until a confirm frees room; ``False``
        (the batch ends) once the deadline has passed."""
        if time.monotonic() >= send.deadline:
            send.unsent_reason = f"not sent: confirm window still full after {send.timeout:g} s"
            return False
        limit = len(self._unconfirmed)
        self._run_until(lambda: len(self._unconfirmed) < limit or self._chan_closed is not None, send.deadline)
        return True

    def _publish_one(self, send: _Send, i: int, rec: OutboxRecord) -> None:
        assert self._chan is not None
        try:
            env = self.codec.encode(rec, "amqp")  # a codec's ValueError / TypeError fails this message only
            stamp = env.timestamp
            key = env.key
            self._chan.basic_publish(
                exchange=rec.topic,
                routing_key=(key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key) or "",
                body=env.payload,
                properties=pika.BasicProperties(
                    headers=env.headers,
                    timestamp=int(stamp.timestamp() if stamp is not None else time.time()),
                    **env.properties,
                ),
                mandatory=self.mandatory,
            )
        except _LINK_ERRORS as exc:
            # A dead connection or channel: the next step reconnects (or reopens) and sends again.
            if self._chan_closed is None and self._conn_lost is None:
                self._conn_lost = exc
            return
        except (ValueError, TypeError) as exc:
            send.todo.popleft()
            send.settle(i, Outcome.FAILED, f"rejected by the AMQP client: {exc}")
            return
        send.todo.popleft()
        self._next_tag += 1
        # a returned message is matched by the message_id property it carries (the codec sets it)
        wire_id = env.properties.get("message_id") or str(rec.message_id)
        self._unconfirmed[self._next_tag] = _Entry(send.batch, i, wire_id, len(rec.payload))
        self._unconfirmed_bytes += len(rec.payload)
        send.batch.inflight += 1
        send.since_poll += 1
        if send.since_poll >= 64:
            send.since_poll = 0
            self._poll(time.monotonic())  # write what is buffered, read confirms, never block

    # ------------------------------------------------------------------ idle, flush, close

    def healthy(self) -> str | None:
        """``None`` while the connection is open, else why not (for readiness). A connection that an
        idle reconnect could not reopen gets one more attempt here, so an idle relay heals too."""
        if self._conn is None:
            try:
                self._connect_once()
            except BrokerUnavailable as exc:
                return str(exc)
            return None
        if self._conn_lost is not None:
            return f"RabbitMQ connection lost: {_describe(self._conn_lost)}"
        return None

    def idle(self, timeout: float) -> None:
        """Serve the connection for up to ``timeout`` s: heartbeats, late confirms, a close by the broker.

        A connection found lost is reopened (one attempt; ``publish`` retries with backoff).
        """
        if self._conn is None:
            return
        deadline = time.monotonic() + max(0.0, timeout)
        while self._conn is not None and self._conn_lost is None:
            self._poll(deadline)
            if time.monotonic() >= deadline:
                break
        if self._conn is None or self._conn_lost is None:
            return
        logger.warning("RabbitMQ connection lost while idle (%s); reconnecting", _describe(self._conn_lost))
        self._drop_connection()
        self._known_exchanges.clear()  # checked again on first use: they may have changed meanwhile
        try:
            self._connect_once()
        except BrokerUnavailable as exc:
            logger.warning("%s; trying again on the next publish", exc)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait (at most ``timeout`` s) until everything sent has been confirmed."""
        if self._conn is None:
            return
        deadline = time.monotonic() + timeout
        self._run_until(lambda: not self._unconfirmed or self._chan_closed is not None, deadline)
        # Also push out anything still buffered (publishes sent without awaiting confirms).
        self._poll(time.monotonic())

    def close(self, timeout: float = 10.0) -> None:
        """Wait for outstanding confirms (bounded by ``timeout``) and close the connection. Safe to call twice."""
        if self._conn is None:
            return
        try:
            if self._conn_lost is None:
                self.flush(timeout)
            if self._unconfirmed:
                logger.warning("closing the RabbitMQ connection with %d unconfirmed message(s)",
                               len(self._unconfirmed))
        finally:
            self._known_exchanges.clear()
            self._drop_connection()

    def __enter__(self) -> RabbitMQPublisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unroutable(reply_text: str, exchange: str, routing_key: str) -> str:
    """The dead reason of a message the broker returned: what happened, and what to do about it."""
    where = f"exchange={exchange!r}, routing_key={routing_key!r}"
    return (f"unroutable: {reply_text} ({where}): no queue is bound to exchange {exchange!r} with a binding "
            f"that matches routing key {routing_key!r}, so the broker returned the message; bind a queue to "
            "the exchange with a matching routing key, or give the exchange an alternate exchange "
            "(policy or argument 'alternate-exchange'), then `outbox dead requeue` the row")
