"""What the Kafka and RabbitMQ runners, threaded and asyncio, share: settings checks, stats, progress, the
DB-retry loop."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import tenacity

from outbox._dberrors import is_transient
from outbox._logging import log_context
from outbox._redact import mask_secrets
from outbox.errors import ConfigurationError
from outbox.incoming import IncomingMessage

from .base import DedupConsumer, Outcome, Status, backoff

log = logging.getLogger("consumers.runner")

#: seconds between the runner's progress lines (0: none), as the relay's ``progress_interval``
PROGRESS_INTERVAL = 10.0


@dataclass
class RunnerStats:
    batches: int = 0
    processed: int = 0
    duplicates: int = 0
    dead: int = 0
    retries: int = 0

    def __str__(self) -> str:
        return (f"processed {self.processed}, duplicates {self.duplicates}, retries {self.retries}, "
                f"dead {self.dead}, batches {self.batches}")


class RunnerBase:
    """What a sync and an async runner share: settings checks, stats, progress lines, the observer,
    the DB-retry delays and the requeue schedule. No I/O here: each loop (threads or asyncio) does its own."""

    def __init__(
        self,
        consumer: Any,
        *,
        engine: Any,
        batch_size: int,
        batch_timeout: float,
        requeue_interval: float | None,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= 100_000:
            raise ConfigurationError(f"batch_size must be an int between 1 and 100000, got {batch_size!r}")
        if not isinstance(batch_timeout, (int, float)) or isinstance(batch_timeout, bool) or batch_timeout <= 0:
            raise ConfigurationError(f"batch_timeout must be a positive number of seconds, got {batch_timeout!r}")
        if requeue_interval is not None and (
            not isinstance(requeue_interval, (int, float)) or requeue_interval <= 0
        ):
            raise ConfigurationError(f"requeue_interval must be positive seconds or None, got {requeue_interval!r}")
        self.consumer = consumer
        self.engine = engine
        self.batch_size = batch_size
        self.batch_timeout = float(batch_timeout)
        self.requeue_interval = requeue_interval
        self.stats = RunnerStats()
        self.progress_interval = PROGRESS_INTERVAL
        self._last_progress = time.monotonic()
        self._progress_mark = (0, 0)  # (processed + duplicates, dead + retries) at the last line
        self._busy = 0.0  # seconds spent in batches since the last progress line
        self._next_requeue_check = 0.0
        self._db_wait = backoff(0.2, 10.0, 0.2)
        self.observer: Any = None
        """optional: ``batch_done(size, outcomes)`` and ``loop_turned(runner)`` are called on the runner's
        thread, and an asyncio runner awaits ``loop_turned_async(runner)`` (if it has one) once a turn
        after ``loop_turned`` (see :class:`outbox.observability.ConsumerMetrics`)"""

    # ------------------------------------------------------------------ one batch, before and after
    def db_failed(self, exc: Exception, size: int, attempt: int) -> float:
        """Log a batch that did not commit; the seconds to wait before trying it again."""
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        delay = float(self._db_wait(state))
        kind = "database trouble" if is_transient(exc) else "unexpected error"
        log.error("consumer %s: batch of %d not committed (%s: %s); trying again in %.1fs",
                  self.consumer.name, size, kind, mask_secrets(f"{type(exc).__name__}: {exc}"), delay)
        return delay

    def batch_done(self, size: int, outcomes: Sequence[Outcome], busy: float) -> None:
        self._busy += busy
        self._count(outcomes)
        if self.observer is not None:
            self.observer.batch_done(size, outcomes)
        self._progress()

    def _progress(self) -> None:
        """Every ``progress_interval`` s with work done: one line, the rate over the time the batches took."""
        every = self.progress_interval
        now = time.monotonic()
        if every <= 0 or now - self._last_progress < every:
            return
        s = self.stats
        mark = (s.processed + s.duplicates, s.dead + s.retries)
        done = mark[0] - self._progress_mark[0]
        if mark != self._progress_mark:
            rate = done / self._busy if self._busy > 0 else 0.0
            log.info("consumer %s: %s (+%d in %.2f s busy: %.0f msg/s)", self.consumer.name, s, done, self._busy,
                     rate)
        self._last_progress, self._progress_mark, self._busy = now, mark, 0.0

    def _count(self, outcomes: Sequence[Outcome]) -> None:
        s = self.stats
        s.batches += 1
        for o in outcomes:  # identity tests: `Status.X.value` is a property call (four a message, before)
            st = o.status
            if st is Status.PROCESSED:
                s.processed += 1
            elif st is Status.DUPLICATE:
                s.duplicates += 1
            elif st is Status.DEAD:
                s.dead += 1
            elif st is Status.RETRY:
                s.retries += 1

    def requeue_due(self) -> bool:
        """Called once per loop turn (the observer hears of every turn here): whether to try this
        consumer's requeued dead letters now (every ``requeue_interval`` seconds)."""
        if self.observer is not None:
            self.observer.loop_turned(self)
        if self.requeue_interval is None:
            return False
        now = time.monotonic()
        if now < self._next_requeue_check:
            return False
        self._next_requeue_check = now + self.requeue_interval
        return True

    def requeued_done(self, outcomes: Sequence[Outcome] | None, exc: Exception | None = None) -> None:
        if exc is not None:
            log.error("consumer %s: requeued dead letters not processed: %s", self.consumer.name,
                      mask_secrets(f"{type(exc).__name__}: {exc}"))
        elif outcomes:
            log.info("consumer %s: %d requeued dead letter(s) tried again", self.consumer.name, len(outcomes))


class RunnerCore(RunnerBase):
    """Settings and loop plumbing common to both (threaded) runners."""

    def __init__(
        self,
        consumer: DedupConsumer,
        *,
        engine: sa.Engine,
        batch_size: int,
        batch_timeout: float,
        requeue_interval: float | None,
    ) -> None:
        if not isinstance(consumer, DedupConsumer):
            raise ConfigurationError(f"consumer must be a DedupConsumer instance, got {consumer!r}")
        if not isinstance(engine, sa.Engine):
            raise ConfigurationError(f"engine must be a sqlalchemy Engine, got {type(engine).__name__}")
        super().__init__(consumer, engine=engine, batch_size=batch_size, batch_timeout=batch_timeout,
                         requeue_interval=requeue_interval)
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask ``run()`` to finish the batch in hand (commit, ack) and return. Safe from any thread or signal."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ processing
    def process(self, batch: Sequence[IncomingMessage]) -> list[Outcome] | None:
        """Process a batch; database trouble is retried (with backoff) until it works or ``stop()``.

        A message's own bad data never gets here (it is dead-lettered inside ``process_batch``);
        what does is the database's trouble (:func:`outbox._dberrors.is_transient`), and no try
        of it counts against a message.

        ``None`` means stopped before the batch committed: acknowledge nothing.
        """
        attempt = 0
        while True:
            attempt += 1
            began = time.monotonic()
            try:
                with log_context(consumer=self.consumer.name):
                    outcomes = self.consumer.process_batch(self.engine, batch)
                break
            except Exception as exc:
                if self._stop.wait(self.db_failed(exc, len(batch), attempt)):
                    return None
        self.batch_done(len(batch), outcomes, time.monotonic() - began)
        return outcomes

    def maybe_process_requeued(self) -> None:
        """Every ``requeue_interval`` seconds, try this consumer's requeued dead letters.

        Both runners call it once per loop turn, so the observer hears of every turn here too.
        """
        if not self.requeue_due():
            return
        try:
            outcomes = self.consumer.process_requeued(self.engine)
        except Exception as exc:
            self.requeued_done(None, exc)
            return
        self.requeued_done(outcomes)


def check_str(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{what} must be a non-empty str, got {value!r}")
    return value


def check_topics(value: object) -> list[str]:
    topics = [value] if isinstance(value, str) else value
    if not isinstance(topics, (list, tuple)) or not topics:
        raise ConfigurationError(f"topics must be a non-empty list of topic names, got {value!r}")
    return [check_str("each topic", t) for t in topics]


Callback = Callable[[], None]


class AsyncRunnerCore(RunnerBase):
    """:class:`RunnerCore` for asyncio runners: ``await process(batch)``, an ``asyncio`` stop.

    ``consumer`` is an async dedup consumer (``await consumer.process_batch(async_engine, messages)``,
    see :class:`consumers.AsyncDedupConsumer`); ``engine`` a SQLAlchemy ``AsyncEngine``.
    """

    def __init__(self, consumer: Any, *, engine: Any, **settings: Any) -> None:
        """``settings``: ``batch_size``, ``batch_timeout`` and ``requeue_interval``, as :class:`RunnerBase`'s."""
        from sqlalchemy.ext.asyncio import AsyncEngine

        if not inspect.iscoroutinefunction(getattr(consumer, "process_batch", None)):
            raise ConfigurationError(f"consumer must be an AsyncDedupConsumer instance (async process_batch), "
                                     f"got {consumer!r}")
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(f"engine must be a sqlalchemy AsyncEngine (create_async_engine), got "
                                     f"{type(engine).__name__}")
        super().__init__(consumer, engine=engine, **settings)
        self._stopped = False
        self._stop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    def _started(self) -> None:
        """Called first thing in ``run()``, on the loop that runs it."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stopped:
            self._stop_event.set()

    def stop(self) -> None:
        """Ask ``run()`` to finish the batch in hand (commit, ack) and return. Safe from the loop (a
        ``loop.add_signal_handler`` callback), from another thread and before ``run()``."""
        self._stopped = True
        loop, event = self._loop, self._stop_event
        if loop is None or event is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    @property
    def stopping(self) -> bool:
        return self._stopped

    async def wait_stop(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; ``True`` as soon as :meth:`stop` is called."""
        event = self._stop_event
        if event is None:
            await asyncio.sleep(seconds)
            return self._stopped
        try:
            await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
        except asyncio.TimeoutError:
            return self._stopped
        return True

    # ------------------------------------------------------------------ processing
    async def process(self, batch: Sequence[IncomingMessage]) -> list[Outcome] | None:
        """As :meth:`RunnerCore.process`: database trouble retried with backoff until it works or ``stop()``;
        ``None`` means stopped before the batch committed: acknowledge nothing."""
        attempt = 0
        while True:
            attempt += 1
            began = time.monotonic()
            try:
                with log_context(consumer=self.consumer.name):
                    outcomes = await self.consumer.process_batch(self.engine, batch)
                break
            except Exception as exc:
                if await self.wait_stop(self.db_failed(exc, len(batch), attempt)):
                    return None
        self.batch_done(len(batch), outcomes, time.monotonic() - began)
        return outcomes

    async def maybe_process_requeued(self) -> None:
        """Every ``requeue_interval`` seconds, try this consumer's requeued dead letters (if it can).

        Both asyncio runners call it once per loop turn: the observer's ``loop_turned_async`` (the lag
        or queue-depth read, awaited without blocking the loop) is awaited here too."""
        due = self.requeue_due()
        observe = getattr(self.observer, "loop_turned_async", None)
        if observe is not None:
            await observe(self)
        if not due:
            return
        requeued = getattr(self.consumer, "process_requeued", None)
        if requeued is None:
            return
        try:
            outcomes = await requeued(self.engine)
        except Exception as exc:
            self.requeued_done(None, exc)
            return
        self.requeued_done(outcomes)
