"""Dedup consumers for asyncio services: the same algorithm, driven with an ``AsyncEngine``.

Subclass :class:`AsyncDedupConsumer` and write ``async def handle(self, session, message)`` with
an :class:`~sqlalchemy.ext.asyncio.AsyncSession`::

    class ChargeOrder(AsyncDedupConsumer):
        name = "billing.charge-order"

        async def handle(self, session, message):
            session.add(Charge(order_id=message.body["order_id"]))
            return {"charged": True}

    outcome = await ChargeOrder().process(async_engine, message)   # one try
    if outcome.done:
        ...  # only now ack the message / commit the offset

The settings, the ids and the algorithm (insert-if-absent per dialect in the handler's
transaction, stored results for duplicates, the SAVEPOINT redo, retries and dead letters, lanes,
requeued dead letters, content-hash ids, staged work) are those of :class:`~consumers.DedupConsumer`:
not a copy, the same code (:class:`~consumers.base.DedupCore`). It runs inside SQLAlchemy's
greenlet bridge (``greenlet_spawn``, which is how SQLAlchemy's asyncio extension itself runs an
async driver), and the handler's coroutine is awaited from there on the event loop, once per
message. The event loop is never blocked: every statement goes through the async driver.

**The ack rule**: ack (RabbitMQ) or commit the offset (Kafka) only after an outcome with
``outcome.done`` (PROCESSED, DUPLICATE, DEAD): the database transaction has then committed. A
RETRY is not done: ack nothing, try again after ``outcome.retry_in`` seconds (or redeliver).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, overload

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox import _tracing
from outbox.errors import ConfigurationError
from outbox.incoming import IncomingMessage

from .base import DedupCore, Outcome, Status, _FastPathFailed, as_batch, settle
from .staged import StagedCore, stage_results

try:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.util import greenlet_spawn

    try:
        from sqlalchemy.util import await_ as _await  # SQLAlchemy >= 2.1
    except ImportError:  # pragma: no cover - SQLAlchemy 2.0
        from sqlalchemy.util import await_only as _await
except ImportError as exc:  # pragma: no cover - greenlet missing
    raise ImportError("the asyncio consumers need greenlet: pip install 'outboxkit[async]'") from exc

__all__ = ["AsyncDedupConsumer", "AsyncStagedConsumer"]

_ASYNC_SESSION = "_outboxkit_async_session"
BeforeCommit = Callable[[], "Awaitable[None] | None"]


def _coroutine_function(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class AsyncDedupConsumer(DedupCore):
    """Base class of an asyncio dedup consumer: you write ``async def handle(session, message)``.

    Class settings and their meaning are those of :class:`~consumers.DedupConsumer`;
    ``session_factory``, if given, is a ``callable(async_engine) -> AsyncSession``.
    """

    async def handle(self, session: AsyncSession, message: IncomingMessage) -> Any:
        """Apply the message. Runs at most once per message id, inside the batch's transaction.

        Use ``session`` for every database effect (``add``, ``await session.execute(...)``; do not
        commit it). Return ``None`` or a JSON-serialisable result: it is stored with the message id
        and handed back for duplicates.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement async handle(session, message)")

    def _check_handlers(self) -> None:
        self._require_coroutine("handle", self.handle)

    def _require_coroutine(self, what: str, fn: object) -> None:
        if not _coroutine_function(fn):
            raise ConfigurationError(f"{type(self).__qualname__}.{what} must be an `async def` for an "
                                     "AsyncDedupConsumer (use DedupConsumer for a sync handler)")

    # ------------------------------------------------------------------ the asyncio driver
    def session(self, engine: AsyncEngine) -> AsyncSession:
        """The :class:`AsyncSession` of one batch transaction (``session_factory`` if given)."""
        if self._session_factory is not None:
            return self._session_factory(engine)  # type: ignore[arg-type,return-value]
        return AsyncSession(bind=engine, expire_on_commit=False, autoflush=True)

    def _session_for(self, engine: AsyncEngine) -> Session:
        asession = self.session(engine)
        if not isinstance(asession, AsyncSession):
            raise ConfigurationError(f"session_factory returned {type(asession).__name__}, not an AsyncSession")
        sync = asession.sync_session
        sync.info[_ASYNC_SESSION] = asession  # keeps the proxy alive for the handler calls of this session
        return sync

    def _sync_engine(self, engine: AsyncEngine) -> Engine:
        return engine.sync_engine

    def _bound(self, fn: Callable[..., Any], session: Session) -> Callable[[Session, IncomingMessage], Any]:
        asession = session.info[_ASYNC_SESSION]

        def call(_session: Session, message: IncomingMessage) -> Any:
            return _await(fn(asession, message))

        return call

    def _handle_all(self, session: Session, messages: Sequence[IncomingMessage]) -> list[Any]:
        """The fast path's handler calls in ONE coroutine awaited on the event loop: one greenlet
        switch a batch instead of one a message (4.8 us a message against 0.5 us for a plain await)."""
        if not messages:
            return []
        return _await(self._ahandle_all(session.info[_ASYNC_SESSION], messages))  # type: ignore[no-any-return]

    async def _ahandle_all(self, asession: AsyncSession, messages: Sequence[IncomingMessage]) -> list[Any]:
        handle = self.handle
        spans = _tracing.process_spans()  # None without OpenTelemetry: looked up once per batch
        out = []
        for m in messages:
            try:
                if spans is None:
                    out.append(await handle(asession, m))
                else:
                    with spans.span(m, self.name):
                        out.append(await handle(asession, m))
            except Exception as exc:
                raise _FastPathFailed(m.id) from exc
        return out

    @staticmethod
    def _engine(engine: object) -> AsyncEngine:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(f"an AsyncDedupConsumer needs an AsyncEngine (create_async_engine), got "
                                     f"{type(engine).__name__}; use DedupConsumer with a sync Engine")
        return engine

    async def process_batch(
        self,
        engine: AsyncEngine,
        messages: Sequence[IncomingMessage],
        *,
        before_commit: BeforeCommit | None = None,
    ) -> list[Outcome]:
        """Process ``messages`` in one transaction; one :class:`~consumers.Outcome` per message, in order.

        As :meth:`consumers.DedupConsumer.process_batch`: each message is tried once; RETRY (with
        ``retry_in``), DEAD after ``max_attempts`` or for a non-retriable error, SKIPPED behind a
        RETRY of its lane. ``before_commit`` (a plain or an ``async`` callable) runs just before
        the commit. Raises only for database trouble (nothing committed).
        """
        hook: Callable[[], None] | None = None
        if before_commit is not None:
            def hook() -> None:
                result = before_commit()
                if inspect.isawaitable(result):
                    _await(result)
        return await greenlet_spawn(self._batch, self._engine(engine), messages, hook)

    @overload
    async def process(self, engine: AsyncEngine, messages: IncomingMessage) -> Outcome: ...

    @overload
    async def process(self, engine: AsyncEngine, messages: Sequence[IncomingMessage]) -> list[Outcome]: ...

    async def process(
        self, engine: AsyncEngine, messages: IncomingMessage | Sequence[IncomingMessage]
    ) -> Outcome | list[Outcome]:
        """Try ``messages`` once; the :class:`~consumers.Outcome` (one message) or outcomes (a sequence).

        For a framework's own handler (FastStream, aiokafka, aio-pika): build the message with
        :func:`consumers.message_from_kafka` / :func:`consumers.message_from_amqp`, then ack only
        when ``outcome.done``. A RETRY counts ``message.attempt`` up, so passing the same message
        again is its next try, and after ``max_attempts`` tries it is DEAD; wait
        ``outcome.retry_in`` seconds first (or let the broker redeliver). :meth:`process_until_done`
        does that loop.
        """
        batch = as_batch(messages)
        outcomes = await self.process_batch(engine, batch)
        for o in outcomes:
            if o.status is Status.RETRY:
                o.message.attempt += 1
        return outcomes[0] if isinstance(messages, IncomingMessage) else outcomes

    async def process_until_done(
        self,
        engine: AsyncEngine,
        messages: IncomingMessage | Sequence[IncomingMessage],
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> list[Outcome]:
        """Process messages to a final outcome (PROCESSED, DUPLICATE or DEAD), retrying with ``await sleep``.

        The asyncio form of :meth:`consumers.DedupConsumer.process`. Database trouble raises.
        """
        batch = as_batch(messages)
        final: dict[int, Outcome] = {}
        pending = batch
        while pending:
            pending, delay = settle(await self.process_batch(engine, pending), final)
            if pending and delay:
                await sleep(delay)
        return [final[id(m)] for m in batch]

    async def process_requeued(self, engine: AsyncEngine, *, limit: int = 100) -> list[Outcome]:
        """Try this consumer's dead letters marked ``requeued`` once more (see
        :meth:`consumers.DedupConsumer.process_requeued`)."""
        return await greenlet_spawn(self._requeued, self._engine(engine), limit)


class AsyncStagedConsumer(StagedCore, AsyncDedupConsumer):
    """:class:`~consumers.StagedConsumer` for asyncio: ``@stage`` methods and ``finish`` are ``async def``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for sname, method in self._plan:
            self._require_coroutine(f"stage {sname!r}", method)
        self._require_coroutine("finish", self.finish)

    def _check_handlers(self) -> None:
        """Stages are checked once the plan is known (``handle`` is not used)."""

    async def finish(self, session: AsyncSession, message: IncomingMessage) -> Any:
        """Runs in the final transaction, with the processed row. Its result is stored (default:
        the stage results, or ``None`` when every stage returned ``None``)."""
        return stage_results(message)
