"""The dedup algorithm: exactly-once database effects on top of at-least-once delivery.

Subclass :class:`DedupConsumer`, give it a ``name`` and a ``handle`` method; a runner (Kafka,
RabbitMQ) or your own code calls :meth:`DedupConsumer.process_batch`. For each batch, in ONE
database transaction:

1. one read of which of the batch's message ids the processed-messages table holds already, with
   their stored results (a duplicate costs that read: it writes nothing, so on PostgreSQL it leaves
   no dead tuple);
2. ``handle`` runs for the ids that were new; duplicates skip it and get the stored result back;
3. one plain INSERT of the new ids with their results (JSON; where the driver can, psycopg, sent
   before the flush of the handlers' rows and waited for after it:
   :meth:`outbox.dialects.Dialect.start_insert_keys`). The table's unique key still
   decides: an id a concurrent consumer committed after the read makes this INSERT fail, the
   whole transaction rolls back and the batch is redone inserting the ids first, with the
   database's insert-if-absent (``ON CONFLICT DO NOTHING RETURNING`` / ``INSERT IGNORE`` /
   ``INSERT OR IGNORE``), which never raises for a duplicate and leaves no dead tuple. SQLite and
   the PostgreSQL partitioned layout always insert first
   (:meth:`outbox.dialects.Dialect.inserts_keys_at_end`);
4. the transaction commits; only then does the runner commit offsets / ack.

Fast path: the batch runs without savepoints. If a handler raises, the whole transaction rolls
back and the batch is run again with a SAVEPOINT per message (its dedup row included), so a
failing handler rolls back only its own effects and its own dedup row. Handlers must therefore
keep their effects in the database transaction (anything outside it may run more than once).
"""

from __future__ import annotations

import datetime as dt
import enum
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
import tenacity
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox import _tracing
from outbox._dberrors import is_data_error, is_transient
from outbox._identifiers import consumer_name
from outbox._redact import mask_secrets
from outbox.dialects import Dialect, dialect_for
from outbox.errors import ConfigurationError, DecodeError, MessageIdMissing
from outbox.incoming import IncomingMessage, content_hash, id_text, storable_id
from outbox.schema import OutboxTables, default_tables
from outbox.serializers import Serializer

from . import deadletters
from .ids import DEFAULT_ID_SOURCES, IdSource, describe_id_sources, parse_id_sources, resolve_id

__all__ = ["DedupConsumer", "DedupCore", "Outcome", "Status"]

log = logging.getLogger("consumers")
_T = TypeVar("_T")

ID_STRATEGIES = ("message-id", "content-hash")
SAVEPOINT_MODES = ("on-failure", "always")


class Status(str, enum.Enum):
    PROCESSED = "processed"
    """``handle`` ran and its effects committed."""
    DUPLICATE = "duplicate"
    """Seen before: ``handle`` skipped, the stored result handed back."""
    RETRY = "retry"
    """``handle`` failed; nothing of it committed; try again after ``retry_in`` seconds."""
    SKIPPED = "skipped"
    """Not tried: an earlier message of the same lane (Kafka partition) is waiting for a retry."""
    DEAD = "dead"
    """Given up: the dead-letter row committed with the batch."""


@dataclass
class Outcome:
    message: IncomingMessage
    status: Status
    result: Any = None
    error: BaseException | None = None
    retry_in: float | None = None

    @property
    def done(self) -> bool:
        """Settled for good: the runner may commit the offset / ack."""
        return self.status in (Status.PROCESSED, Status.DUPLICATE, Status.DEAD)


class _FastPathFailed(Exception):
    pass


class _InsertAtEndFailed(Exception):
    """The read-first fast path's dedup insert failed: most likely a concurrent transaction
    committed one of the ids after the read (a unique violation)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class DedupCore:
    """Settings, ids, retry decisions and the dedup algorithm, shared by the sync and the asyncio consumer.

    The algorithm is written once, against a sync :class:`~sqlalchemy.orm.Session` /
    :class:`~sqlalchemy.engine.Connection`. :class:`DedupConsumer` runs it directly;
    :class:`consumers.AsyncDedupConsumer` runs the very same code inside SQLAlchemy's greenlet bridge
    (``greenlet_spawn``), which is how SQLAlchemy's asyncio extension drives an async driver, and
    awaits the ``async def handle`` from there. What differs between the two lives in the driver
    hooks only: :meth:`_session_for`, :meth:`_sync_engine` and :meth:`_bound`, each called once per
    batch (or per savepoint / stage), never per statement.
    """

    #: the consumer's name: part of the dedup key, so never rename a running consumer
    name: str = ""
    #: tries per message (in this process) before it goes to the dead letters
    max_attempts: int = 5
    #: exponential backoff with jitter between tries (tenacity ``wait_exponential_jitter``), seconds
    retry_initial: float = 0.5
    retry_max: float = 30.0
    retry_jitter: float = 0.5
    #: where the message id comes from: an ordered list of id sources (see :mod:`consumers.ids`), e.g.
    #: ``"header:NServiceBus.MessageId,message_id"``; ``None``: the default, ``header:message-id,
    #: cloudevents, header:id, message_id`` (outboxkit, CloudEvents, Debezium, AMQP property)
    id_from: str | Sequence[str] | None = None
    #: ``"message-id"`` (the id sources of ``id_from``) or ``"content-hash"`` (SHA-256 of topic, key and
    #: payload, whatever the message's own id: identical content is processed once; the same as
    #: ``id_from="hash"``, except that it also overrides an id already set on the message)
    id_strategy: str = "message-id"
    #: optional id extractor for other producers: ``staticmethod(func(message) -> str | None)``
    #: (or a regular method); it gets the :class:`IncomingMessage` (``.raw`` is the broker's object)
    message_id: Callable[[IncomingMessage], str | None] | None = None
    #: decodes ``message.body``; the default is :class:`outbox.serializers.JSONSerializer`
    serializer: Serializer | None = None
    #: ``"on-failure"`` (fast: savepoints only when redoing a batch that had a failure) or ``"always"``
    savepoints: str = "on-failure"
    #: exceptions that go to the dead letters at once, without retries
    non_retriable: tuple[type[BaseException], ...] = (DecodeError, MessageIdMissing)
    #: what users write (a driver defines it: ``def`` for the sync one, ``async def`` for asyncio)
    handle: Callable[..., Any]

    def __init__(
        self,
        *,
        name: str | None = None,
        max_attempts: int | None = None,
        retry_initial: float | None = None,
        retry_max: float | None = None,
        retry_jitter: float | None = None,
        id_strategy: str | None = None,
        id_from: str | Sequence[str] | None = None,
        message_id: Callable[[IncomingMessage], str | None] | None = None,
        serializer: Serializer | None = None,
        savepoints: str | None = None,
        tables: OutboxTables | None = None,
        session_factory: Callable[[sa.Engine], Session] | None = None,
    ) -> None:
        cls = type(self)
        self.name = consumer_name(name if name is not None else cls.name) if (name or cls.name) else ""
        if not self.name:
            raise ConfigurationError(f"{cls.__qualname__} has no name: set the class attribute `name`")
        self.max_attempts = _positive_int("max_attempts", cls.max_attempts if max_attempts is None else max_attempts)
        self.retry_initial = _non_negative("retry_initial",
                                           cls.retry_initial if retry_initial is None else retry_initial)
        self.retry_max = _non_negative("retry_max", cls.retry_max if retry_max is None else retry_max)
        self.retry_jitter = _non_negative("retry_jitter", cls.retry_jitter if retry_jitter is None else retry_jitter)
        self.id_strategy = id_strategy if id_strategy is not None else cls.id_strategy
        if self.id_strategy not in ID_STRATEGIES:
            raise ConfigurationError(f"id_strategy must be one of {ID_STRATEGIES}, got {self.id_strategy!r}")
        if id_from is not None and self.id_strategy == "content-hash":
            raise ConfigurationError("give id_from or id_strategy='content-hash', not both (id_from='hash' is the "
                                     "content hash)")
        spec = id_from if id_from is not None else cls.id_from
        self.id_sources: tuple[IdSource, ...] = (
            DEFAULT_ID_SOURCES if spec is None else parse_id_sources(spec, f"{cls.__qualname__}.id_from"))
        if message_id is not None:
            if not callable(message_id):
                raise ConfigurationError(f"message_id must be a callable(message) -> str | None, got {message_id!r}")
            self.message_id = message_id
        if serializer is not None:
            if not isinstance(serializer, Serializer):
                raise ConfigurationError(f"serializer {serializer!r} has no serialize/deserialize methods")
            self.serializer = serializer
        self.savepoints = savepoints if savepoints is not None else cls.savepoints
        if self.savepoints not in SAVEPOINT_MODES:
            raise ConfigurationError(f"savepoints must be one of {SAVEPOINT_MODES}, got {self.savepoints!r}")
        if tables is not None and not isinstance(tables, OutboxTables):
            raise ConfigurationError(f"tables must be an OutboxTables, got {tables!r}")
        self.tables: OutboxTables = tables or default_tables()
        if session_factory is not None and not callable(session_factory):
            raise ConfigurationError("session_factory must be a callable(engine) -> Session")
        self._session_factory = session_factory
        self._wait = backoff(self.retry_initial, self.retry_max, self.retry_jitter)
        self._dialects: dict[str, Dialect] = {}

        self._check_handlers()

    def _check_handlers(self) -> None:
        """Refuse, at construction, handlers of the wrong kind (the async driver wants coroutines)."""

    # ------------------------------------------------------------------ ids and retries
    def identify(self, message: IncomingMessage) -> str:
        """The dedup id of ``message``; raises :class:`MessageIdMissing` if there is no usable one.

        In order: the id stored with a requeued dead letter; the ``message_id`` extractor if set;
        the content hash with ``id_strategy="content-hash"``; ``message.id`` if already set (a
        message built by your own code); else the first of ``id_sources`` (``id_from``) that
        yields a value (:func:`consumers.ids.resolve_id`).

        Ids are stored losslessly (see :func:`outbox.incoming.id_text`): a ``bytes`` or ``str``
        id that is not plain UTF-8 text, holds NUL or is longer than 255 characters gets a
        distinct, stable text form.
        """
        if message.dead_letter_id is not None and message.id:
            return message.id  # as stored with the dead letter
        known = message._identified
        if known is not None and known[0] is self:  # found before (a runner's bookkeeping): not again
            if isinstance(known[1], MessageIdMissing):
                raise known[1]
            return known[1]  # type: ignore[no-any-return]
        try:
            found = self._identify(message)
        except MessageIdMissing as exc:
            message._identified = (self, exc)
            raise
        message._identified = (self, found)
        return found

    def _identify(self, message: IncomingMessage) -> str:
        value: object = None
        if self.message_id is not None:
            try:
                value = self.message_id(message)
            except Exception as exc:  # one message's problem (a missing header, bad JSON), never the batch's
                raise MessageIdMissing(
                    f"no message id: the message_id extractor raised {mask_secrets(f'{type(exc).__name__}: {exc}')}"
                ) from exc
            if isinstance(value, (bytes, bytearray, memoryview)) and bytes(value).strip():
                return id_text(value)
            if isinstance(value, str) and value.strip():
                return id_text(value)
        elif self.id_strategy == "content-hash":
            return content_hash(message.topic, message.key, message.payload)
        else:
            value = message.id
            if isinstance(value, str) and value.strip():
                return value if storable_id(value) else id_text(value)
            found = resolve_id(message, self.id_sources)
            if found is not None:
                return found
            raise MessageIdMissing(f"no message id (tried {describe_id_sources(self.id_sources)}); set the "
                                   "consumer's id_from (--id-from) to where this producer puts its id")
        if value is None or isinstance(value, (str, bytes, bytearray, memoryview)):  # empty or blank
            raise MessageIdMissing("no message id: the message_id extractor returned none")
        raise MessageIdMissing(f"no message id: the extractor returned a {type(value).__name__}, not a str")

    def find_id(self, message: IncomingMessage) -> str | None:
        """:meth:`identify`, but ``None`` instead of raising (for a runner's own bookkeeping)."""
        try:
            return self.identify(message)
        except Exception:
            return None

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (exponential, with jitter)."""
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = max(1, attempt)
        return float(self._wait(state))

    def is_retriable(self, exc: BaseException) -> bool:
        """Whether another try of the message can help: not for ``non_retriable`` exceptions, nor
        when the database refused the message's own values (:func:`outbox._dberrors.is_data_error`)."""
        return not isinstance(exc, self.non_retriable) and not is_data_error(exc)

    # ------------------------------------------------------------------ driver hooks
    def _session_for(self, engine: Any) -> Session:
        """A new sync Session on ``engine`` (the driver's own engine) for one transaction."""
        raise NotImplementedError

    def _sync_engine(self, engine: Any) -> sa.Engine:
        """The sync Engine behind the driver's ``engine``, for plain connections."""
        raise NotImplementedError

    def _bound(self, fn: Callable[..., Any], session: Session) -> Callable[[Session, IncomingMessage], Any]:
        """``fn`` (``handle``, a stage, ``finish``) as a plain ``(session, message) -> result`` callable."""
        raise NotImplementedError

    def _handle_all(self, session: Session, messages: Sequence[IncomingMessage]) -> list[Any]:
        """``handle`` for each of ``messages`` in order (the fast path), their results; the first that
        raises stops the rest: :class:`_FastPathFailed` from it. Here one call a message; the asyncio
        driver awaits them all in one coroutine on the event loop (one greenlet switch a batch)."""
        handle = self._bound(self.handle, session)
        spans = _tracing.process_spans()  # None without OpenTelemetry: looked up once per batch
        out = []
        for m in messages:
            try:
                out.append(handle(session, m) if spans is None else _tracing.traced(spans, handle, session, m,
                                                                                      self.name))
            except Exception as exc:
                raise _FastPathFailed(m.id) from exc
        return out

    # ------------------------------------------------------------------ the algorithm
    def dialect(self, bind: Any) -> Dialect:
        name = bind.dialect.name
        d = self._dialects.get(name)
        if d is None:
            d = self._dialects[name] = dialect_for(bind)
        return d

    def _batch(
        self,
        engine: Any,
        messages: Sequence[IncomingMessage],
        before_commit: Callable[[], None] | None,
    ) -> list[Outcome]:
        """The algorithm of ``process_batch`` (see :meth:`DedupConsumer.process_batch`)."""
        outcomes: list[Outcome | None] = [None] * len(messages)
        now = _now()
        work: list[int] = []
        no_id: list[tuple[int, MessageIdMissing]] = []
        for i, m in enumerate(messages):
            if m.serializer is None:
                m.serializer = self.serializer
            try:
                m.id = self.identify(m)
            except MessageIdMissing as exc:
                no_id.append((i, exc))
            else:
                work.append(i)
        if self.savepoints == "on-failure" and work:
            try:
                try:
                    self._fast(engine, messages, work, no_id, outcomes, now, before_commit, read_first=True)
                except _InsertAtEndFailed as exc:
                    log.debug("consumer %s: the dedup insert at the end of the batch failed (%s); redoing the "
                              "batch inserting the ids first", self.name, mask_secrets(exc.__cause__))
                    self._fast(engine, messages, work, no_id, outcomes, now, before_commit, read_first=False)
            except _FastPathFailed as exc:
                log.debug("consumer %s: a handler failed (%s); redoing the batch with savepoints", self.name,
                          mask_secrets(exc.__cause__))
            else:
                return [o for o in outcomes if o is not None]
        self._slow(engine, messages, work, no_id, outcomes, now, before_commit)
        return [o for o in outcomes if o is not None]

    def _dedup_rows(self, ids: Iterable[str], now: dt.datetime) -> list[dict[str, Any]]:
        return [{"consumer": self.name, "message_id": i, "processed_at": now} for i in ids]

    def _fast(
        self,
        engine: Any,
        messages: Sequence[IncomingMessage],
        work: list[int],
        no_id: list[tuple[int, MessageIdMissing]],
        outcomes: list[Outcome | None],
        now: dt.datetime,
        before_commit: Callable[[], None] | None,
        *,
        read_first: bool,
    ) -> None:
        """The batch in one transaction, without savepoints; raises :class:`_FastPathFailed` (rolled
        back) when a handler or a statement fails, for :meth:`_slow` to redo the batch.

        ``read_first`` (where the dialect allows it, :meth:`Dialect.inserts_keys_at_end`): a read of
        which ids are stored already (duplicates then cost a read and leave nothing behind; in parts
        that overlap the handlers, see :meth:`_read_and_handle`), the handlers, then one plain
        INSERT of the new ids with their results (no insert-if-absent, no results UPDATE). An id a
        concurrent transaction committed after the read makes that INSERT fail (the unique
        constraint still decides): everything rolls back and :class:`_InsertAtEndFailed` has the
        batch redone with ``read_first=False``: the ids inserted if absent first (a concurrent
        insert of the same id then waits for the other transaction),
        the results stored by UPDATE.
        """
        with self._session_for(engine) as session:
            with session.begin():
                conn = session.connection()
                dialect = self.dialect(conn)
                processed = self.tables.processed
                read_first = read_first and dialect.inserts_keys_at_end(conn, processed)
                if read_first:  # the stored ids read in parts, a part's handlers run during the next part's read
                    todo, dups, handled, stored = self._read_and_handle(session, conn, dialect, messages, work)
                else:
                    ids = list(dict.fromkeys(messages[i].id for i in work))  # type: ignore[misc]
                    try:  # one round trip on PostgreSQL: the new ids, and the stored results of those seen before
                        new, stored = dialect.insert_new_keys_reading(
                            conn, processed, "message_id", ids, {"consumer": self.name, "processed_at": now}, "result")
                    except Exception as exc:
                        if is_transient(exc):
                            raise
                        raise _FastPathFailed("dedup insert") from exc  # isolate the message it is about
                    todo, dups = [], []
                    for i in work:
                        if messages[i].id in new:
                            new.discard(messages[i].id)  # type: ignore[arg-type]  # a second copy in the batch is a duplicate
                            todo.append(i)
                        else:
                            dups.append(i)
                    handled = self._handle_all(session, [messages[i] for i in todo])
                results: dict[str, Any] = {}  # id -> result, of those with a result to store
                fresh: dict[str, Any] = {}  # id -> result, of the messages handled in this batch
                for i, result in zip(todo, handled, strict=True):
                    m = messages[i]
                    outcomes[i] = Outcome(m, Status.PROCESSED, result)
                    fresh[m.id] = result  # type: ignore[index]
                    if result is not None:
                        results[m.id] = result  # type: ignore[index]
                keys_values = {"consumer": self.name, "processed_at": now}
                # where the driver can (psycopg), the dedup insert goes out now and the server runs it while
                # the flush below prepares the handlers' rows (their statements then wait for it on the connection)
                started = (_dedup_insert(lambda: dialect.start_insert_keys(conn, processed, "message_id", keys_values,
                                                                           "result", fresh))
                           if read_first and fresh else None)
                try:
                    session.flush()
                    if not read_first:
                        self._store_results(conn, results)
                except Exception as exc:
                    if started is not None:  # its failure (an id a concurrent consumer committed) aborted the flush
                        _dedup_insert(started)
                    raise _FastPathFailed("flush") from exc
                if started is not None:
                    _dedup_insert(started)
                elif read_first and fresh:
                    _dedup_insert(lambda: dialect.insert_keys(conn, processed, "message_id", keys_values, "result",
                                                              fresh))
                # a second copy of an id handled in this batch with a result: the result as stored (its JSON form)
                again = [messages[i].id for i in dups
                         if messages[i].id not in stored and fresh.get(messages[i].id) is not None]  # type: ignore[arg-type]
                if again:
                    stored.update(self._stored_results(conn, again))  # type: ignore[arg-type]
                for i in dups:
                    outcomes[i] = Outcome(messages[i], Status.DUPLICATE, stored.get(messages[i].id))  # type: ignore[arg-type]
                for i in work:
                    dead_id = messages[i].dead_letter_id
                    if dead_id is not None:
                        deadletters.mark_resolved(conn, self.tables, dead_id)
                self._record_no_id(conn, messages, no_id, outcomes, now)
                if before_commit is not None:
                    before_commit()

    def _read_and_handle(
        self, session: Session, conn: Connection, dialect: Dialect, messages: Sequence[IncomingMessage], work: list[int]
    ) -> tuple[list[int], list[int], list[Any], dict[str, Any]]:
        """The read-first fast path's look-up of the stored ids and the handlers of the new messages,
        in parts of the batch (:func:`_read_parts`): the dialect sends a part's read before the
        previous part's handlers run (:meth:`Dialect.read_existing_in_parts`), so the server looks up
        ids while the handlers work. The handlers run in message order, each id's first copy only.
        Returns the handled and the duplicate indices, the handlers' results and the stored results."""
        parts = _read_parts(work)
        seen: set[str] = set()
        first: set[int] = set()  # the indices of each id's first copy in the batch
        keys: list[list[str]] = []
        for part in parts:
            ids = []
            for i in part:
                mid: str = messages[i].id  # type: ignore[assignment]
                if mid not in seen:
                    seen.add(mid)
                    first.add(i)
                    ids.append(mid)
            keys.append(ids)
        reads = dialect.read_existing_in_parts(conn, self.tables.processed, "message_id", keys,
                                               {"consumer": self.name}, "result")
        stored: dict[str, Any] = {}
        todo: list[int] = []
        dups: list[int] = []
        handled: list[Any] = []
        try:
            for part in parts:
                try:
                    stored.update(next(reads))
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    raise _FastPathFailed("dedup read") from exc  # isolate the message it is about
                now_todo = [i for i in part if i in first and messages[i].id not in stored]  # later copies: duplicates
                dups.extend(i for i in part if i not in first or messages[i].id in stored)
                handled.extend(self._handle_all(session, [messages[i] for i in now_todo]))
                todo.extend(now_todo)
        finally:
            reads.close()
        return todo, dups, handled, stored

    def _slow(
        self,
        engine: Any,
        messages: Sequence[IncomingMessage],
        work: list[int],
        no_id: list[tuple[int, MessageIdMissing]],
        outcomes: list[Outcome | None],
        now: dt.datetime,
        before_commit: Callable[[], None] | None,
    ) -> None:
        for i in work:
            outcomes[i] = None
        with self._session_for(engine) as session:
            with session.begin():
                conn = session.connection()
                dialect = self.dialect(conn)
                dialect.ensure_transaction(conn)
                blocked: set[tuple[str, int]] = set()
                for i in work:
                    m = messages[i]
                    if m.lane is not None and m.lane in blocked:
                        outcomes[i] = Outcome(m, Status.SKIPPED)
                        continue
                    outcome = self._one_with_savepoint(session, conn, dialect, m, now)
                    outcomes[i] = outcome
                    if outcome.status is Status.RETRY and m.lane is not None:
                        blocked.add(m.lane)
                self._record_no_id(conn, messages, no_id, outcomes, now)
                if before_commit is not None:
                    before_commit()

    def _one_with_savepoint(
        self, session: Session, conn: Connection, dialect: Dialect, m: IncomingMessage, now: dt.datetime
    ) -> Outcome:
        sp = session.begin_nested()
        try:
            conn = session.connection()  # emits the SAVEPOINT (the session begins it lazily)
            new = dialect.insert_new_keys(conn, self.tables.processed, self._dedup_rows([m.id], now), "message_id")  # type: ignore[list-item]
            if new:
                result = _tracing.traced(_tracing.process_spans(), self._bound(self.handle, session), session, m,
                                         self.name)
                session.flush()
                if result is not None:
                    self._store_results(conn, {m.id: result})  # type: ignore[dict-item]
                outcome = Outcome(m, Status.PROCESSED, result)
            else:
                outcome = Outcome(m, Status.DUPLICATE, self._stored_results(conn, [m.id]).get(m.id))  # type: ignore[list-item,arg-type]
            if m.dead_letter_id is not None:
                deadletters.mark_resolved(conn, self.tables, m.dead_letter_id)
            sp.commit()
            return outcome
        except Exception as exc:
            if sp.is_active:
                sp.rollback()
            if is_transient(exc):
                raise  # the database's trouble, not the message's: the runner retries the batch
            return self._failed(conn, m, exc, now)

    def _failed(self, conn: Connection, m: IncomingMessage, exc: Exception, now: dt.datetime) -> Outcome:
        """Decide RETRY or DEAD for a failed try; DEAD writes the dead-letter row (same transaction)."""
        if m.first_failed_at is None:
            m.first_failed_at = now
        final = m.dead_letter_id is not None or not self.is_retriable(exc) or m.attempt >= self.max_attempts
        if not final:
            delay = self.retry_delay(m.attempt)
            log.warning("consumer %s: message %s failed (try %d of %d), retrying in %.2fs: %s", self.name, m.id,
                        m.attempt, self.max_attempts, delay, mask_secrets(f"{type(exc).__name__}: {exc}"))
            return Outcome(m, Status.RETRY, error=exc, retry_in=delay)
        log.error("consumer %s: message %s goes to the dead letters after %d tries: %s", self.name, m.id, m.attempt,
                  mask_secrets(f"{type(exc).__name__}: {exc}"))
        deadletters.record_dead_letter(conn, self.tables, self.name, m, exc, attempts=m.attempt,
                                       first_failed_at=m.first_failed_at, now=now)
        return Outcome(m, Status.DEAD, error=exc)

    def _record_no_id(
        self,
        conn: Connection,
        messages: Sequence[IncomingMessage],
        no_id: list[tuple[int, MessageIdMissing]],
        outcomes: list[Outcome | None],
        now: dt.datetime,
    ) -> None:
        for i, exc in no_id:
            m = messages[i]
            log.error("consumer %s: a message on %s has no usable id (%s): dead-lettered, not processed",
                      self.name, m.topic, exc)
            deadletters.record_dead_letter(conn, self.tables, self.name, m, exc, attempts=m.attempt, now=now)
            outcomes[i] = Outcome(m, Status.DEAD, error=exc)

    def _store_results(self, conn: Connection, results: dict[str, Any]) -> None:
        """Store ``{id: result}`` in the rows of this consumer's ids (one statement on PostgreSQL)."""
        if results:
            self.dialect(conn).update_by_keys(conn, self.tables.processed, "message_id", {"consumer": self.name},
                                              "result", results)

    def _stored_results(self, conn: Connection, ids: list[str]) -> dict[str, Any]:
        if not ids:
            return {}
        return self.dialect(conn).read_existing(conn, self.tables.processed, "message_id", list(dict.fromkeys(ids)),
                                                {"consumer": self.name}, "result")

    def _requeued(self, engine: Any, limit: int) -> list[Outcome]:
        """The algorithm of ``process_requeued``."""
        with self._sync_engine(engine).connect() as conn:
            msgs = deadletters.requeued_messages(conn, self.tables, self.name, limit)
        if not msgs:
            return []
        return self._batch(engine, msgs, None)


class DedupConsumer(DedupCore):
    """Base class of a dedup consumer: the algorithm lives here, you write ``handle``.

    Settings are class attributes; each can be overridden per instance with a keyword argument::

        class ChargeOrder(DedupConsumer):
            name = "billing.charge-order"
            max_attempts = 5

            def handle(self, session, message):
                ...
                return {"charge_id": charge.id}
    """

    # ------------------------------------------------------------------ what users write
    def handle(self, session: Session, message: IncomingMessage) -> Any:
        """Apply the message. Runs at most once per message id, inside the batch's transaction.

        Use ``session`` for every database effect (do not commit it). Return ``None`` or a
        JSON-serialisable result: it is stored with the message id and handed back for duplicates.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement handle(session, message)")

    # ------------------------------------------------------------------ the sync driver
    def session(self, engine: sa.Engine) -> Session:
        if self._session_factory is not None:
            return self._session_factory(engine)
        return Session(bind=engine, expire_on_commit=False, autoflush=True)

    def _session_for(self, engine: sa.Engine) -> Session:
        return self.session(engine)

    def _sync_engine(self, engine: sa.Engine) -> sa.Engine:
        return engine

    def _bound(self, fn: Callable[..., Any], session: Session) -> Callable[[Session, IncomingMessage], Any]:
        return fn

    def process_batch(
        self,
        engine: sa.Engine,
        messages: Sequence[IncomingMessage],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> list[Outcome]:
        """Process ``messages`` in one transaction; one :class:`Outcome` per message, in order.

        Each message is tried once (``message.attempt`` says which try it is). A failure gives
        ``RETRY`` (with ``retry_in``) or, after ``max_attempts`` tries or for a non-retriable
        error, ``DEAD`` (the dead-letter row commits with the batch). Later messages of the same
        lane as a ``RETRY`` are ``SKIPPED``. Raises only for database trouble (nothing committed):
        errors caused by one message's data, in the dead-letter path too, make that message
        ``DEAD``; transient errors (:func:`outbox._dberrors.is_transient`) propagate.
        """
        return self._batch(engine, messages, before_commit)

    # ------------------------------------------------------------------ convenience
    def process(
        self,
        engine: sa.Engine,
        messages: IncomingMessage | Sequence[IncomingMessage],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> list[Outcome]:
        """Process messages to a final outcome (PROCESSED, DUPLICATE or DEAD), retrying in this thread.

        Database trouble (a lost connection, a deadlock) raises, as from :meth:`process_batch`:
        nothing of the failed batch committed.
        """
        batch = as_batch(messages)
        final: dict[int, Outcome] = {}
        pending = batch
        while pending:
            pending, delay = settle(self.process_batch(engine, pending), final)
            if pending and delay:
                sleep(delay)
        return [final[id(m)] for m in batch]

    def process_requeued(self, engine: sa.Engine, *, limit: int = 100) -> list[Outcome]:
        """Try the dead letters of this consumer marked ``requeued`` once more, through the dedup algorithm.

        Each row ends ``resolved`` (processed now, or found already processed) or back at
        ``dead`` with the new error.
        """
        return self._requeued(engine, limit)


def _dedup_insert(run: Callable[[], _T]) -> _T:
    """Run, start or wait for the fast path's dedup insert at the end: a transient error is raised as
    it is, any other (a unique violation, a result the column cannot take) has the batch redone
    inserting the ids first."""
    try:
        return run()
    except Exception as exc:
        if is_transient(exc):
            raise
        raise _InsertAtEndFailed("dedup insert") from exc


#: the fewest messages a part of a batch's read (see _read_parts): below that a statement's fixed cost
#: (a round trip, parse and plan) outweighs what the server's look-ups overlap
_READ_PART = 128


def _read_parts(work: list[int]) -> list[list[int]]:
    """``work`` cut into up to 3 near-equal parts of at least :data:`_READ_PART` messages (one part
    for a small batch). The first part's read is waited for; where the dialect can, each later one
    runs while the handlers of the part before it do, so a 500-message batch waits for a third of
    its look-ups (3 parts measured best; each part's read costs the client about 0.3 ms to start)."""
    n = min(3, len(work) // _READ_PART) or 1
    size = -(-len(work) // n)
    return [work[i:i + size] for i in range(0, len(work), size)]


def as_batch(messages: IncomingMessage | Sequence[IncomingMessage]) -> list[IncomingMessage]:
    """One message or a sequence of them, as a list."""
    return [messages] if isinstance(messages, IncomingMessage) else list(messages)


def settle(outcomes: Sequence[Outcome], final: dict[int, Outcome]) -> tuple[list[IncomingMessage], float]:
    """Record the final outcomes in ``final`` (by message identity); return the messages to try again
    (each RETRY's ``attempt`` counted up) and how long to wait before that."""
    again: list[IncomingMessage] = []
    delay = 0.0
    for o in outcomes:
        if o.done:
            final[id(o.message)] = o
        else:
            again.append(o.message)
            if o.status is Status.RETRY:
                o.message.attempt += 1
                delay = max(delay, o.retry_in or 0.0)
    return again, delay


def backoff(initial: float, maximum: float, jitter: float) -> tenacity.wait.wait_base:
    """tenacity's exponential backoff with jitter: ``initial * 2**(n-1)`` (capped) plus up to ``jitter`` s."""
    if "multiplier" in inspect.signature(tenacity.wait_exponential_jitter.__init__).parameters:
        return tenacity.wait_exponential_jitter(multiplier=initial, max=maximum, jitter=jitter)
    return tenacity.wait_exponential_jitter(initial=initial, max=maximum, jitter=jitter)  # tenacity < 9.1


def _positive_int(what: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{what} must be a positive int, got {value!r}")
    return value


def _non_negative(what: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ConfigurationError(f"{what} must be a non-negative number of seconds, got {value!r}")
    return float(value)
