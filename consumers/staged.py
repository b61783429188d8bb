"""Staged work: a message whose handling has several steps, each committed on its own.

Use it when a step has a slow or external side effect (upload a file, call a payment API) that
must not be repeated when the message is redelivered after a later step failed::

    class Fulfil(StagedConsumer):
        name = "shipping.fulfil"

        @stage("reserve")
        def reserve(self, session, message): ...

        @stage("label")
        def label(self, session, message):
            reservation = message.stage_results["reserve"]
            ...

Each stage runs in its own transaction, which also records ``(consumer, message id, stage)`` in
the stages table: a finished stage's database effects and its record commit together. A
redelivered message resumes at the first unfinished stage. When every stage is done, the
processed row is written (with :meth:`StagedConsumer.finish`'s result) and the stage records are
removed. Side effects outside the database in a stage are at-least-once: a crash after the
external call but before the stage's commit repeats that one stage, so make them idempotent
(for example pass the message id as the idempotency key of the API).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox._dberrors import is_transient
from outbox.errors import ConfigurationError, MessageIdMissing
from outbox.incoming import IncomingMessage

from . import deadletters
from .base import DedupConsumer, DedupCore, Outcome, Status, _now

__all__ = ["StagedConsumer", "StagedCore", "stage"]

F = TypeVar("F", bound=Callable[..., Any])
_STAGE_ATTR = "_outbox_stage"
_STAGE_NAME_LENGTH = 100


def stage(name: str) -> Callable[[F], F]:
    """Mark a method ``(self, session, message) -> result`` as the stage ``name`` (stages run in definition order)."""
    if not isinstance(name, str) or not name or len(name) > _STAGE_NAME_LENGTH:
        raise ConfigurationError(f"stage name must be a non-empty str of at most {_STAGE_NAME_LENGTH} characters,"
                                 f" got {name!r}")

    def mark(fn: F) -> F:
        setattr(fn, _STAGE_ATTR, name)
        return fn

    return mark


class StagedCore(DedupCore):
    """The staged algorithm, shared by :class:`StagedConsumer` and :class:`consumers.AsyncStagedConsumer`
    (the driver, listed after it in the bases, supplies the I/O hooks)."""

    #: method names, in order (optional: the default is the ``@stage`` methods in definition order)
    stages: ClassVar[Sequence[str]] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._plan = self._stage_plan()

    def _stage_plan(self) -> list[tuple[str, Callable[[Session, IncomingMessage], Any]]]:
        cls = type(self)
        plan: list[tuple[str, Callable[[Session, IncomingMessage], Any]]] = []
        if cls.stages:
            if isinstance(cls.stages, str):
                raise ConfigurationError(f"{cls.__qualname__}.stages must be a list of method names, not a str")
            for attr in cls.stages:
                method = getattr(self, attr, None) if isinstance(attr, str) else None
                if not callable(method):
                    raise ConfigurationError(f"{cls.__qualname__}.stages names {attr!r}, which is not a method")
                plan.append((getattr(method, _STAGE_ATTR, attr), method))
        else:
            seen: dict[str, str] = {}
            for klass in reversed(cls.__mro__):
                for attr, value in vars(klass).items():
                    if getattr(value, _STAGE_ATTR, None) is not None:
                        seen.pop(attr, None)
                        seen[attr] = getattr(value, _STAGE_ATTR)
            plan = [(sname, getattr(self, attr)) for attr, sname in seen.items()]
        if not plan:
            raise ConfigurationError(f"{cls.__qualname__} declares no stages: decorate methods with @stage('name')")
        names = [n for n, _ in plan]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"{cls.__qualname__} has duplicate stage names: {names}")
        for n in names:
            if len(n) > _STAGE_NAME_LENGTH:
                raise ConfigurationError(f"stage name {n!r} is longer than {_STAGE_NAME_LENGTH} characters")
        return plan

    @property
    def stage_names(self) -> list[str]:
        return [n for n, _ in self._plan]

    def handle(self, session: Session, message: IncomingMessage) -> Any:  # pragma: no cover - not used
        raise NotImplementedError("a StagedConsumer runs its stages, not handle()")

    #: runs in the final transaction (a driver defines it)
    finish: Callable[..., Any]

    # ------------------------------------------------------------------ algorithm
    def _batch(
        self,
        engine: Any,
        messages: Sequence[IncomingMessage],
        before_commit: Callable[[], None] | None,
    ) -> list[Outcome]:
        """Like :meth:`DedupConsumer.process_batch`, one message at a time (each stage its own transaction)."""
        outcomes: list[Outcome] = []
        blocked: set[tuple[str, int]] = set()
        for m in messages:
            now = _now()
            if m.serializer is None:
                m.serializer = self.serializer
            if m.lane is not None and m.lane in blocked:
                outcomes.append(Outcome(m, Status.SKIPPED))
                continue
            try:
                m.id = self.identify(m)
            except MessageIdMissing as exc:
                with self._sync_engine(engine).begin() as conn:
                    deadletters.record_dead_letter(conn, self.tables, self.name, m, exc, attempts=m.attempt, now=now)
                outcomes.append(Outcome(m, Status.DEAD, error=exc))
                continue
            try:
                outcome = self._run(engine, m, before_commit)
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database's trouble: the runner retries the batch
                with self._sync_engine(engine).begin() as conn:
                    outcome = self._failed(conn, m, exc, now)
                if outcome.status is Status.RETRY and m.lane is not None:
                    blocked.add(m.lane)
            outcomes.append(outcome)
        return outcomes

    def _run(self, engine: Any, m: IncomingMessage, before_commit: Callable[[], None] | None) -> Outcome:
        processed, stages = self.tables.processed, self.tables.stages
        key = (stages.c.consumer == self.name, stages.c.message_id == m.id)
        sync_engine = self._sync_engine(engine)
        with sync_engine.connect() as conn:
            row = conn.execute(
                sa.select(processed.c.result).where(processed.c.consumer == self.name, processed.c.message_id == m.id)
            ).first()
            if row is None:
                done = {r[0]: r[1] for r in conn.execute(sa.select(stages.c.stage, stages.c.result).where(*key))}
        if row is not None:
            if m.dead_letter_id is not None:
                with sync_engine.begin() as conn:
                    deadletters.mark_resolved(conn, self.tables, m.dead_letter_id)
            return Outcome(m, Status.DUPLICATE, row[0])
        m.stage_results = dict(done)
        for sname, method in self._plan:
            if sname in m.stage_results:
                continue
            with self._session_for(engine) as session, session.begin():
                conn = session.connection()
                stage_row = {"consumer": self.name, "message_id": m.id, "stage": sname, "completed_at": _now()}
                if not self.dialect(conn).insert_new_keys(conn, stages, [stage_row], "stage"):
                    # finished meanwhile by another delivery of the same message: take its result
                    m.stage_results[sname] = conn.execute(
                        sa.select(stages.c.result).where(*key, stages.c.stage == sname)
                    ).scalar()
                    continue
                result = self._bound(method, session)(session, m)
                session.flush()
                if result is not None:
                    conn.execute(stages.update().where(*key, stages.c.stage == sname).values(result=result))
            m.stage_results[sname] = result
        with self._session_for(engine) as session, session.begin():
            conn = session.connection()
            now = _now()
            new = self.dialect(conn).insert_new_keys(conn, processed, self._dedup_rows([m.id], now), "message_id")  # type: ignore[list-item]
            if new:
                result = self._bound(self.finish, session)(session, m)
                session.flush()
                self._store_results(conn, {m.id: result} if result is not None else {})  # type: ignore[dict-item]
                conn.execute(stages.delete().where(*key))
                outcome = Outcome(m, Status.PROCESSED, result)
            else:
                outcome = Outcome(m, Status.DUPLICATE, self._stored_results(conn, [m.id]).get(m.id))  # type: ignore[list-item,arg-type]
            if m.dead_letter_id is not None:
                deadletters.mark_resolved(conn, self.tables, m.dead_letter_id)
            if before_commit is not None:
                before_commit()
        return outcome



def stage_results(message: IncomingMessage) -> Any:
    """The default ``finish`` result: the stage results, or ``None`` when every stage returned ``None``."""
    results = {k: v for k, v in message.stage_results.items() if v is not None}
    return results or None


class StagedConsumer(StagedCore, DedupConsumer):
    """A dedup consumer whose work is a sequence of stages, each committed as it finishes.

    Declare stages with :func:`stage` on methods, or list method names in ``stages``.
    """

    def finish(self, session: Session, message: IncomingMessage) -> Any:
        """Runs in the final transaction, with the processed row. Its result is stored (default:
        the stage results, or ``None`` when every stage returned ``None``)."""
        return stage_results(message)
