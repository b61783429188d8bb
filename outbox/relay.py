"""The relay: claims committed outbox rows, publishes them, then deletes (or marks) them.

One round, in one database transaction per batch:

1. lock the lease rows of the partitions this relay holds (so no other relay can take them over
   until this transaction ends, and leases lost meanwhile are not claimed from), then claim up to
   ``batch_size`` pending, available rows of those partitions, in ``id`` order within each
   partition (``FOR UPDATE SKIP LOCKED`` where the database has it), leaving out, under strict
   ordering, rows behind an earlier dead or backing-off row of their (topic, key);
2. publish them and wait for the broker's verdict on each (Kafka acks / RabbitMQ confirms);
3. in the same transaction, whose lease row locks still fence the batch (the leases' owners and
   generations cannot have changed since step 1; SQLite re-reads them), delete the delivered rows
   (or mark them ``published`` in audit mode), give failed rows a backoff, and mark permanently
   failed or exhausted rows ``dead``; commit.

A claimed row the relay cannot interpret (:mod:`outbox._rows`) is marked ``dead`` with its
reason in step 1 and never reaches the publisher. Database errors are classified
(:mod:`outbox._dberrors`): outages are retried with backoff; a permanent error in step 3 rolls
the transaction back and the marking is redone in a new one (leases locked again) step by step,
then row by row in SAVEPOINTs, so only the offending row is marked dead and a delivered batch is
never published again because of it.

A crash anywhere before the commit leaves the rows pending, so they are published again: at least
once, never lost. A pause anywhere (GC, SIGSTOP) delays the relay's partitions but cannot reorder
them: per (topic, key), first deliveries are in id order. Rows are only ever read after their
writer committed, so a rolled-back message is never published.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from tenacity import wait_exponential, wait_random

from . import _tracing, dialects
from ._dberrors import is_permanent
from ._logging import log_context
from ._redact import mask_secrets
from ._rows import (
    ROW_ID,
    ROW_KEY,
    ROW_PARTITION,
    ROW_TOPIC,
    RowError,
    claim_columns,
    decode_row,
    overdue_rows,
    unclaimable_rows,
)
from ._sqlerrors import ADDED_COLUMNS, missing_column_error
from .config import RelayConfig
from .dialects.base import Blocker, PreparedSelect
from .errors import BrokerUnavailable, ConfigurationError, SchemaMissing
from .leases import LeaseManager, _ranges, default_relay_id
from .message import OutboxRecord
from .schema import DUE_NOW, STATUS_DEAD, STATUS_PENDING, STATUS_PUBLISHED, OutboxTables, default_tables
from .transports.base import Outcome, Publisher, PublishResult

__all__ = ["Relay", "RelayStats"]

log = logging.getLogger("outbox.relay")

#: errors after which the relay backs off and starts over (reconnecting), instead of crashing
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (sa.exc.DBAPIError, sa.exc.TimeoutError, BrokerUnavailable)
_MAX_ERROR_TEXT = 2000
#: seconds between look-ups of rows whose delay ran out and of keys blocked behind failing rows
REFRESH = 0.1
#: seconds between looks for rows no claim can reach (partition out of range, unknown status)
SWEEP_INTERVAL = 5.0
#: seconds between two checks that the partitioned retention layout has its coming days' partitions
PARTITIONS_INTERVAL = 3600.0
#: seconds between full re-reads of every partition from its first due row
WATERMARK_RESET = 5.0
#: longest wait between two calls of the publisher's ``idle()`` while the relay sleeps
IDLE_SERVICE = 1.0
#: renew intervals after which a relay kept busy by wake-ups renews before its next claim (< 3: the lease TTL)
RENEW_GRACE = 1.5
#: fewest rows the portable claim (joined back by id) may take from one partition (its share of the
#: batch is never smaller); a claim by quotas (PostgreSQL, see Relay._quotas) asks idle partitions for one
MIN_PER_PARTITION = 16


def _loop_errors(engine: Engine) -> tuple[type[BaseException], ...]:
    """:data:`TRANSIENT_ERRORS` plus the engine's driver's own error class.

    SQLAlchemy wraps a driver error in a ``DBAPIError`` where it runs a statement, but not everywhere
    a listener may touch the connection (``engine_connect``, for one): a connection lost there reaches
    the loop as the driver's raw ``OperationalError``. It is the database's trouble as much as the
    wrapped kind, so the loop backs off and reconnects instead of stopping the daemon.
    """
    driver_error = getattr(getattr(engine.dialect, "loaded_dbapi", None), "Error", None)
    if isinstance(driver_error, type) and issubclass(driver_error, BaseException):
        return (*TRANSIENT_ERRORS, driver_error)
    return TRANSIENT_ERRORS


@dataclass
class RelayStats:
    published: int = 0
    retried: int = 0
    dead: int = 0
    rounds: int = 0
    fenced: int = 0
    """rows not marked because their partition's lease moved to another relay"""
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Relay:
    """Publishes committed outbox rows through a :class:`~outbox.brokers.Publisher`.

    ``run()`` is the daemon loop (stop it with :meth:`stop`, e.g. from a signal handler);
    ``drain()`` publishes everything that is due and returns, for scripts and tests.
    """

    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        *,
        config: RelayConfig | None = None,
        tables: OutboxTables | None = None,
        on_published: Callable[[Sequence[OutboxRecord]], None] | None = None,
        broker_kind: str | None = None,
        broker_target: str | None = None,
    ) -> None:
        """``broker_kind``/``broker_target`` (e.g. ``"kafka"``, ``"host:9092"``; never credentials) are
        recorded in the relays table: the relays of one group must publish to the same broker.
        The kind defaults to the publisher's class name (``KafkaPublisher`` -> ``kafka``)."""
        self.publisher = publisher
        self.config = config or RelayConfig()
        _check_codec(publisher, self.config)
        self.tables = tables or default_tables()
        self.dialect = dialects.dialect_for(engine)
        # the relay's own pool, whose sessions the server ends when idle in a transaction for longer
        # than config.idle_transaction_timeout (a frozen relay cannot hold its lease locks forever)
        self.engine = self.dialect.relay_engine(engine, self.config.idle_transaction_timeout)
        self._own_engine = self.engine is not engine
        self.relay_id = self.config.relay_id or default_relay_id()
        self.stats = RelayStats()
        self.on_published = on_published
        self.leases = LeaseManager(
            engine=self.engine, tables=self.tables, dialect=self.dialect, relay_id=self.relay_id,
            ttl=self.config.lease_ttl, min_partitions=self.config.partitions,
            group=self.config.group, topics=self.config.topics,
            broker_kind=broker_kind or _publisher_kind(publisher), broker_target=broker_target,
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._started = False
        self._last_rebalance = 0.0
        self._last_partitions = -PARTITIONS_INTERVAL  # partitioned retention layout: at start, then hourly
        self._last_progress = time.monotonic()
        self._progress_mark = 0
        self._busy = 0.0  # seconds spent in rounds that published since the last progress line
        self._listener: Any = None
        self._active_partitions: set[int] = set()
        # partitions that gave the last claim its whole quota of them (see _quotas)
        self._saturated: set[int] = set()
        self._blocked: set[Blocker] = set()
        # partition -> lease generation seen at the last claim, and partitions acquired since
        # whose claims still get the gap check (see _may_have_gaps)
        self._claim_gens: dict[int, int] = {}
        self._suspect: set[int] = set()
        self._last_refresh = 0.0
        self._refresh_due = True
        self._held_set: list[int] = []
        # partition -> last id published there. Between refreshes a claim starts after it, so a
        # long drain does not walk over the index entries of rows it already deleted.
        self._after: dict[int, int] = {}
        self._reread_due = False  # the next claim reads every partition from its start (see _claim_rows)
        self._claim_cache: tuple[tuple[Any, ...], sa.Select[Any], sa.Select[Any]] | None = None
        self._promote_select: tuple[tuple[int, ...], PreparedSelect] | None = None  # see _promote
        self._last_watermark_reset = 0.0
        # row id -> whether it was delivered: rows no statement could update (see _give_up_row)
        self._unmarkable: dict[int, bool] = {}
        self._last_sweep = 0.0
        self._claimed_at = 0.0  # monotonic time the last claim statement returned
        self._locked: list[int] = []  # partitions whose lease rows the last claim locked
        self._warned_pool = False  # warned once that the pool cannot lend a connection for claims ahead
        self.db_label = mask_secrets(engine.url.render_as_string(hide_password=True))
        self._transient = _loop_errors(self.engine)

    # ------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and leave (safe from signal handlers)."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Claim again now instead of waiting out the idle interval."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        """Check the database, connect the broker, register and take a fair share of partitions."""
        with self.engine.connect() as conn:
            self.dialect.check_server(conn)
            inspector = sa.inspect(conn)
            for t in (self.tables.outbox, self.tables.leases, self.tables.relays):
                if not inspector.has_table(t.name, schema=t.schema):
                    raise SchemaMissing(
                        f"table {t.name!r} does not exist in {self.db_label}: run `outbox db upgrade` first"
                    )
            o = self.tables.outbox
            have = {c["name"] for c in inspector.get_columns(o.name, schema=o.schema)}
            for column in ADDED_COLUMNS:  # the claim reads them: an older schema fails every claim
                if column not in have:
                    raise missing_column_error(o.name, column, self.db_label)
        self._after.clear()
        self._refresh_due = True
        self.engine = self.dialect.prepare_relay_engine(self.engine)
        self.leases.engine = self.engine
        # join first: a relay that waits (standby, or for a crashed incarnation to expire) holds no
        # broker connection meanwhile; stop() ends the wait
        if not self.leases.join(self._stop):
            return
        self.publisher.start()
        self.leases.ensure_partitions()
        self.leases.rebalance()
        self._last_rebalance = time.monotonic()
        self._sweep_unclaimable(force=True)
        self._maintain_partitions()
        if self.config.notify and self._listener is None:
            self._listener = self.dialect.start_listener(
                self.engine, self.tables.names.outbox, self._wake.set, self._stop
            )
        self._started = True

    def close(self) -> None:
        """Release leases, leave the relays table and close the publisher (bounded waits)."""
        try:
            self.publisher.close(timeout=self.config.shutdown_timeout)
        except Exception as exc:
            log.warning("closing the publisher failed: %s", mask_secrets(exc))
        try:
            self.leases.release_all()
            self.leases.unregister()
        except Exception as exc:
            log.warning("could not release leases (they expire in %.0f s): %s", self.config.lease_ttl,
                        mask_secrets(exc))
        self._started = False
        if self._own_engine:
            self._dispose_quietly()

    # ------------------------------------------------------------------ loops
    def run(self) -> RelayStats:
        """Publish until :meth:`stop` is called. Database and broker outages are retried forever."""
        waits = wait_exponential(multiplier=0.5, max=30.0) + wait_random(0, 0.5)
        with log_context(relay_id=self.relay_id, relay_group=self.config.group):
            return self._run(waits)

    def _run(self, waits: Any) -> RelayStats:
        failures = 0
        idle = self.config.min_poll_interval
        woke = False  # the wait before this round ended with a wake-up (work announced)
        log.info("relay %s starting on %s (ordering=%s, batch=%d)", self.relay_id, self.db_label,
                 self.config.ordering, self.config.batch_size)
        try:
            while not self._stop.is_set():
                try:
                    if not self._started:
                        self.start()
                        log.info("relay %s holds partitions %s", self.relay_id, _ranges(list(self.leases.held)))
                    # after a wake-up, renew only if overdue: a renewal due is done while idle (below)
                    self._maybe_rebalance(overdue_only=woke)
                    began = time.monotonic()
                    n = self.run_once()
                    if n > 0:
                        self._busy += time.monotonic() - began
                    # so few rows that no partition's share was full: the claim took all that was
                    # due, and NOTIFY wakes the loop for what commits next, with no empty claim
                    # round in between to delay it
                    rest = n == 0 or (n < min(MIN_PER_PARTITION, self.config.batch_size)
                                      and self._listener is not None)
                    if rest and not self._wake.is_set():
                        self._maybe_rebalance()  # nothing to do: the moment for a renewal that is due
                    failures = 0
                except self._transient as exc:
                    failures += 1
                    self.stats.errors += 1
                    self._started = False
                    delay = waits(_RetryState(failures))
                    self._log_loop_error(exc, delay)
                    self._dispose_quietly()
                    self._sleep(delay)
                    woke = False
                    continue
                self._progress()
                if n > 0:  # busy: start idling from the shortest wait
                    idle = self.config.min_poll_interval
                if not rest:
                    woke = False
                    continue  # claim again at once
                woke = self._sleep(idle)
                idle = min(idle * 2, self.config.poll_interval)
        finally:
            log.info("relay %s stopping: %s", self.relay_id, self._summary())
            if self._started:
                self.close()
            else:
                try:
                    self.publisher.close(timeout=self.config.shutdown_timeout)
                except Exception:
                    pass
        return self.stats

    def drain(self, *, timeout: float | None = None) -> int:
        """Publish every row that is due now, then return how many were published."""
        deadline = None if timeout is None else time.monotonic() + timeout
        before = self.stats.published
        self._refresh_due = True
        if not self._started:
            self.start()
        while not self._stop.is_set():
            self._maybe_rebalance()
            n = self.run_once()
            if n == 0:
                break
            if deadline is not None and time.monotonic() > deadline:
                break
        return self.stats.published - before

    def run_once(self) -> int:
        """Claim-publish-mark rounds. Returns the number of rows claimed.

        One round, unless pipelining is on (:attr:`RelayConfig.pipeline`): then, while the broker
        acknowledges a full batch, the next one is claimed in a second transaction, and the rounds
        go on back to back as long as every batch is delivered whole (see :meth:`_claim_ahead`).
        """
        if not self._started:
            self.start()
        held = sorted(self.leases.held)
        if not held:
            return 0
        batch = self._open_batch(held)
        total = 0
        while batch is not None:
            ahead: _Batch | None = None
            try:
                age = time.monotonic() - batch.claimed_at
                if age > self.config.stale_claim_age:
                    raise _StaleBatch(age, len(batch.records))
                wait = self._begin_publish(batch.records)
                ahead = self._claim_ahead(batch)
                results = self._verdicts(batch.records, wait)
                delivered = self._mark(batch, results)
                batch.end(commit=True)
            except BaseException as exc:
                if ahead is not None:
                    ahead.abandon()
                err = batch.abort(exc)
                stale = _stale_in(err) if isinstance(err, (_StaleBatch, sa.exc.DBAPIError)) else None
                if stale is None:
                    if err is exc:
                        raise
                    raise err from exc
                self._drop_stale(stale, err)
                return total
            self.stats.rounds += 1
            total += len(batch.records)
            batch = self._resume(ahead, whole=delivered == len(batch.records))
        return total

    def _open_batch(self, held: list[int]) -> _Batch | None:
        """Begin a batch's transaction: lock the leases and claim. ``None`` (committed) when nothing was claimed."""
        conn = self.engine.connect()
        batch = _Batch(conn, conn.begin(), held)
        try:
            batch.records = self._claim(conn, held, _now(), batch.on_commit)
            batch.claimed_at = self._claimed_at
            batch.held = self._locked
            if not batch.records:
                batch.end(commit=True)
                return None
        except BaseException as exc:
            err = batch.abort(exc)
            if err is exc:
                raise
            raise err from exc
        return batch

    def _claim_ahead(self, batch: _Batch) -> _Batch | None:
        """While ``batch`` waits for the broker: claim the next batch of the same partitions in a
        second transaction, or ``None`` when pipelining is off or this is no time for it.

        Safe because ``batch``'s transaction holds the lease locks of these partitions meanwhile (no
        relay can take them over), and the claim starts each partition after ``batch``'s rows (whose
        row locks SKIP LOCKED would pass over anyway). Nothing of it is published before ``batch`` is
        marked and committed, and then only if every row of ``batch`` was delivered and the leases
        are still this relay's under the same generations (:meth:`_resume`); otherwise it is rolled
        back unpublished. Never after a failure, nor when the look-up of delayed rows and blocked keys
        says a partition is to be re-read from its start (which must not happen past a batch in flight).
        """
        if (not self._pipelined() or self._refresh_due or self._reread_due or self._stop.is_set()
                or self._rebalance_due()):
            return None
        if self._held_set != batch.held or not self._spare_connection():
            return None
        for rec in batch.records:  # the next claim starts after this batch's rows in each partition
            if rec.id > self._after.get(rec.partition, 0):
                self._after[rec.partition] = rec.id
        ahead: _Batch | None = None
        try:
            conn = self.engine.connect()
            ahead = _Batch(conn, conn.begin(), batch.held)
            records = self._claim_rows(conn, batch.held, _now(), ahead.on_commit, ahead=True)
            ahead.claimed_at = self._claimed_at
        except BaseException as exc:
            if ahead is not None:
                ahead.abandon()
            if not isinstance(exc, self._transient):
                raise
            # Claiming ahead is an optimisation on a second connection: its failure must not undo
            # the batch in flight, which is waited for and marked on its own connection (and fails
            # there in turn if the database is gone). The next claim re-reads from the start.
            self._refresh_due = True
            log.warning("claiming the next batch ahead failed, the batch in flight goes on: %s", _short(exc))
            return None
        if records is None:  # the next claim re-reads partitions from before the watermark
            ahead.abandon()
            return None
        ahead.records = records
        if not records:
            # rows marked dead here as undecodable: committed under the first batch's lease locks
            ahead.end(commit=True)
            return None
        return ahead

    def _resume(self, ahead: _Batch | None, *, whole: bool) -> _Batch | None:
        """The batch claimed ahead, now the previous one is committed, with its leases locked; or
        ``None`` (rolled back unpublished) if the previous batch was not delivered whole, its leases
        moved, the relay is stopping or due to renew its leases, or the claim grew stale."""
        if ahead is None:
            return None
        fresh = time.monotonic() - ahead.claimed_at <= self.config.stale_claim_age
        if not (whole and fresh and not self._stop.is_set() and not self._rebalance_due()
                and sorted(self.leases.held) == ahead.held):
            ahead.abandon()
            self._refresh_due = True
            return None
        try:
            locked = self.leases.lock_for_claim(ahead.conn)
        except BaseException:
            ahead.abandon()
            raise
        if locked != ahead.held:
            ahead.abandon()
            self._refresh_due = True
            return None
        return ahead

    def _begin(self) -> Callable[..., Callable[[], list[PublishResult]]] | None:
        """The publisher's two-step send (queue, then wait), if it has one: the relay claims its next batch
        in between. Looked up on the current publisher each time (a decorator such as the metrics one may
        replace it after construction) and on its class (a decorator's ``__getattr__`` must not hand over
        the inner adapter's, bypassing the decorator)."""
        publisher = self.publisher
        if getattr(type(publisher), "begin_publish", None) is None:
            return None
        return publisher.begin_publish  # type: ignore[attr-defined,no-any-return]

    def _spare_connection(self) -> bool:
        """Whether the relay's pool can lend a second connection now, without waiting.

        The batch in flight holds one. The relay's pool copies the application engine's settings,
        which may allow a single connection (``pool_size=1, max_overflow=0``): then a claim ahead
        would wait out the pool timeout in every round. It is skipped instead, with one warning.
        """
        pool = self.engine.pool
        limit = getattr(pool, "_max_overflow", -1)
        if not isinstance(pool, sa.pool.QueuePool) or limit < 0 or pool.checkedout() < pool.size() + limit:
            return True
        if not self._warned_pool:
            self._warned_pool = True
            log.warning("the relay's connection pool (pool_size=%d, max_overflow=%d) has no connection to spare for "
                        "claiming the next batch while one is in flight: pipelining is off; give the engine "
                        "pool_size=2 or more", pool.size(), limit)
        return False

    def _pipelined(self) -> bool:
        return self.config.pipeline and self.dialect.supports_pipelined_claims and self._begin() is not None

    def _rebalance_due(self) -> bool:
        return time.monotonic() - self._last_rebalance >= self.config.renew_interval

    def _drop_stale(self, stale: _StaleBatch, exc: BaseException) -> None:
        """A batch claimed too long ago (the relay was frozen) was rolled back unpublished.

        The database may have ended the claim's transaction meanwhile (see
        :attr:`RelayConfig.idle_transaction_timeout`) and another relay may own those partitions
        now and have published past the batch: publishing it would send its rows out of order.
        The rows stay pending for whoever owns their partitions; the next round reconnects.
        """
        gone = exc is not stale  # the rollback itself failed: the server had ended the session
        log.warning("dropped a stale batch of %d claimed row(s) unpublished: %.1f s passed since the claim "
                    "(more than %.1f s: this relay was frozen or starved), so its transaction may have been "
                    "ended by the database and its partitions taken over%s", stale.rows, stale.age,
                    self.config.stale_claim_age, " (it was: the session is gone)" if gone else "")
        self._refresh_due = True
        if gone:
            self._dispose_quietly()  # other pooled connections of the frozen process may be dead too

    # ------------------------------------------------------------------ steps
    def _promote(self, conn: Connection, held: list[int], now: dt.datetime, *,
                 look_only: bool = False) -> dict[int, int]:
        """Rows whose delay or backoff has run out become due (``available_at = DUE_NOW``); returns
        their ids, each with its partition.

        Read first, then update by primary key: a range UPDATE on InnoDB would lock the next
        index record too, which is another partition's (another relay's) first due row.
        ``look_only``: return them without updating (a claim made ahead must not write rows
        that the batch in flight's transaction may have just updated: it would wait on that
        transaction, which waits on it).
        """
        o = self.tables.outbox
        key = tuple(held)
        if self._promote_select is None or self._promote_select[0] != key:  # built once per set of partitions
            q = (
                sa.select(o.c.id, o.c.partition)
                .where(o.c.partition.in_(held), o.c.status == STATUS_PENDING)
                .where(o.c.available_at > DUE_NOW,
                       o.c.available_at <= sa.bindparam("promote_now", now, type_=o.c.available_at.type))
            )
            topic_clause = self.dialect.topic_filter(o, self.config.topics)
            if topic_clause is not None:  # this relay group's rows only
                q = q.where(topic_clause)
            self._promote_select = (key, self.dialect.prepared_select(q))
        found = {r[0]: r[1] for r in self._promote_select[1](conn, {"promote_now": now})}
        if not look_only:
            for chunk in _chunks(sorted(found), 1000):
                self.dialect.update_ids(conn, o, chunk, {"available_at": DUE_NOW})
        return found

    def _claim(self, conn: Connection, held: list[int], now: dt.datetime,
               on_commit: list[Callable[[], None]]) -> list[OutboxRecord]:
        # Lock our lease rows first: while this transaction (claim, publish, mark) is open nobody
        # can take these partitions over, and leases we lost while we were not looking (a pause
        # before this round) are not claimed from. See LeaseManager.lock_for_claim.
        held = self._locked = self.leases.lock_for_claim(conn)
        if not held:
            return []
        self._note_acquired()
        return self._claim_rows(conn, held, now, on_commit) or []

    def _claim_rows(self, conn: Connection, held: list[int], now: dt.datetime,
                    on_commit: list[Callable[[], None]], *, ahead: bool = False) -> list[OutboxRecord] | None:
        """Claim due rows of the locked partitions ``held``; what to count and log once the claim's
        transaction commits goes to ``on_commit`` (see :meth:`_decode`).

        ``ahead``: a claim while the previous batch is in flight (see :meth:`_claim_ahead`), which
        must not re-read any partition from before the watermark: if the look-up of delayed rows
        and blocked keys finds it should, it returns ``None`` and leaves that to the next claim.
        """
        # Delayed rows and the keys held back behind failing ones change slowly: look them up at
        # most every REFRESH seconds (and after any failure), not in every round of a busy drain.
        mono = time.monotonic()
        promoted: dict[int, int] = {}
        if self._refresh_due or mono - self._last_refresh >= REFRESH or self._held_set != held:
            promoted = self._promote(conn, held, now, look_only=ahead)
            blocked_before = self._blocked
            if self.config.ordering == "strict":
                self._blocked = set(self._blockers(conn, held))
            # Re-read partitions from their start where rows may now be due behind the watermark:
            # everywhere after a failure, a change of partitions, an unblocked key, or every
            # WATERMARK_RESET seconds (rows committed late with a lower id); else only where
            # delayed rows just became due.
            reread = (self._refresh_due or self._held_set != held or blocked_before - self._blocked
                      or mono - self._last_watermark_reset >= WATERMARK_RESET)
            if ahead and (reread or promoted):
                self._refresh_due = True
                return None
            if reread:
                self._after.clear()
                self._last_watermark_reset = mono
            else:
                for p in set(promoted.values()):
                    self._after.pop(p, None)
            self._last_refresh, self._refresh_due, self._held_set = mono, False, list(held)
        if self._reread_due:
            # the last claim took all that was due: read each partition from its first due row, so
            # a row committed late with a lower id goes out now (the statement is the same)
            if ahead:
                return None
            self._after.clear()
            self._reread_due = False
        blocked = sorted(self._blocked)
        o = self.tables.outbox
        quotas = self._quotas(held)
        claimed = None if quotas is None else self.dialect.claim_by_quota(
            conn, o, self._claim_columns, held, quotas, DUE_NOW, blocked,
            self._after, topics=self.config.topics)
        rows: Sequence[Any]
        due_ids: sa.Select[Any] | None
        params: dict[str, Any] = {}  # the start ids of a statement built once (none: claimed by quota)
        if claimed is not None:  # each partition's share read and locked in place (PostgreSQL)
            per_partition = max(quotas or [1])
            rows = claimed
            due_ids = None
        else:
            # share the batch among the partitions that had rows last time, so a few busy keys still
            # fill a batch, while each partition is read through the claim index in id order
            active = len(self._active_partitions & set(held)) or len(held)
            per_partition = max(MIN_PER_PARTITION, -(-self.config.batch_size // active))
            stmt, due_ids = self._claim_statement(held, per_partition, blocked)
            params = self.dialect.due_ids_params(held, self._after)
            rows = conn.execute(stmt, params).all()
        self._claimed_at = time.monotonic()
        if rows and self.dialect.supports_skip_locked and self._may_have_gaps(rows):
            if due_ids is None:  # the same rows' ids, unlocked: what the claim would have taken without SKIP LOCKED
                due_ids = self._due_ids(held, per_partition, blocked)[1]
            rows = self._without_gaps(conn, rows, due_ids, params)
        self._active_partitions = {r[ROW_PARTITION] for r in rows}
        if quotas is not None and claimed is not None:
            # the partitions that gave their whole quota: they may have more, and share the next batch
            taken: dict[int, int] = defaultdict(int)
            for r in rows:
                taken[r[ROW_PARTITION]] += 1
            self._saturated = {p for p, q in zip(held, quotas, strict=True) if taken[p] >= q}
            drained = not self._saturated
        else:
            drained = len(rows) < self.config.batch_size
        if drained:
            # not a full drain: re-read from the partitions' start next time. Delayed rows and
            # blocked keys are looked up on their own clock (REFRESH, and after any failure): an
            # idle relay's claim is then the lease lock and this one statement
            self._reread_due = True
        if promoted and not promoted.keys() <= {r[ROW_ID] for r in rows}:
            # Rows this transaction made due but did not claim (beyond a partition's share, or past
            # the batch) are due only in its own snapshot until it commits. A claim made ahead while
            # this batch is out reads after the batch's last row of each partition, finds them still
            # delayed (not locked: SKIP LOCKED and the gap check see nothing) and would take their
            # partition's later rows, of the same keys, first. No claim ahead this round; the next
            # claim reads the partitions from their start.
            self._refresh_due = True
        return self._decode(conn, rows, on_commit)

    @functools.cached_property
    def _claim_columns(self) -> list[sa.ColumnElement[Any]]:
        """What the claim reads (:func:`claim_columns`), built once: about 0.3 ms of an idle round when
        built for every claim (twelve column expressions, for the claim's form to be looked up by their names)."""
        return claim_columns(self.tables.outbox, self.dialect.claim_timestamp)

    def _quotas(self, held: list[int]) -> list[int] | None:
        """How many rows the claim takes at most from each of ``held``, adding up to ``batch_size``;
        ``None`` when the batch is smaller than the partition count (no share for each of them).

        The partitions that gave the last claim all it asked of them (they may have more) share the
        batch; the others are asked for one row each, so rows that appear there are claimed at once
        and the partition shares the next batch. Without such partitions (the first claim, or the
        last one took everything due), the batch is shared evenly.
        """
        batch, n = self.config.batch_size, len(held)
        if batch < n:
            return None
        busy = [p in self._saturated for p in held]
        n_busy = sum(busy)
        if n_busy == 0:
            base, extra = divmod(batch, n)
            return [base + (i < extra) for i in range(n)]
        base, extra = divmod(batch - (n - n_busy), n_busy)
        quotas = []
        for b in busy:
            if b:
                quotas.append(base + (extra > 0))
                extra -= 1
            else:
                quotas.append(1)
        return quotas

    def _claim_statement(self, held: list[int], per_partition: int,
                         blocked: list[Blocker]) -> tuple[sa.Select[Any], sa.Select[Any]]:
        """The claim statement and the look-up of the due ids it claims from (for the gap check).

        Built again only when what it is built from changed, not when only the partitions' start
        ids did (they are bind parameters, :meth:`~outbox.dialects.base.Dialect.due_ids_params`): the
        rounds of a drain and of an idle relay reuse the last one, which saves building it and
        SQLAlchemy's cache key for it (about 0.3-0.6 ms of CPU a round; a tenth of a MariaDB drain).
        """
        key = (tuple(held), per_partition, tuple(blocked))
        cached = self._claim_cache
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        o = self.tables.outbox
        ids, due_ids = self._due_ids(held, per_partition, blocked)
        cols = self._claim_columns
        stmt = sa.select(*cols).join_from(o, ids, o.c.id == ids.c.id).order_by(o.c.id)
        stmt = self.dialect.lock_claim(stmt.limit(self.config.batch_size), o)
        self._claim_cache = (key, stmt, due_ids)
        return stmt, due_ids

    def _due_ids(self, held: list[int], per_partition: int,
                 blocked: list[Blocker]) -> tuple[sa.Subquery, sa.Select[Any]]:
        """The due ids of ``held`` (at most ``per_partition`` a partition), and their (id, partition) look-up."""
        ids = self.dialect.due_ids(self.tables.outbox, held, per_partition, DUE_NOW, blocked, self._after,
                                   topics=self.config.topics)
        return ids, sa.select(ids.c.id, ids.c.partition)

    def _note_acquired(self) -> None:
        """Partitions (re)acquired since the last claim, from anyone, become suspect (see below)."""
        held = self.leases.held
        for p, gen in held.items():
            if self._claim_gens.get(p) != gen:
                self._claim_gens[p] = gen
                self._suspect.add(p)
        for p in [p for p in self._claim_gens if p not in held]:
            del self._claim_gens[p]
            self._suspect.discard(p)

    def _may_have_gaps(self, rows: Sequence[Any]) -> bool:
        """Whether SKIP LOCKED may have passed over one of our rows in this claim.

        Where a dialect's claim can lock into its neighbours' index ranges
        (``skip_locked_reaches_neighbours``; none of ours), always check. Otherwise a previous
        owner's batch cannot overlap ours (:meth:`LeaseManager.lock_for_claim`), but a
        partition we acquired stays *suspect* until one claim of it skipped nothing, with no time
        limit: a row lock taken outside a lease lock (a relay of an older version during a rolling
        upgrade, a hand-written ``SELECT ... FOR UPDATE``) must not let later rows overtake it.
        """
        if self.dialect.skip_locked_reaches_neighbours:
            return True
        return bool(self._suspect) and any(r[ROW_PARTITION] in self._suspect for r in rows)

    def _without_gaps(self, conn: Connection, rows: Sequence[Any], due_ids: sa.Select[Any],
                      params: Mapping[str, Any]) -> list[Any]:
        """Keep, per partition, only the claimed rows before the first row SKIP LOCKED passed over.

        Partitions are leased, so normally nobody else holds our rows' locks. But during a lease
        handover the previous owner may still hold some (and a hand-written ``FOR UPDATE`` any).
        Publishing past a skipped row would break per-key order, so the rest of that partition
        waits for the next round.
        """
        by_id = {r[ROW_ID]: r for r in rows}
        claimed_parts: dict[int, list[int]] = defaultdict(list)
        for r in rows:
            claimed_parts[r[ROW_PARTITION]].append(r[ROW_ID])
        expected: dict[int, list[int]] = defaultdict(list)
        for i, p in sorted(tuple(r) for r in conn.execute(due_ids, params)):
            expected[p].append(i)
        keep: list[Any] = []
        cut = 0
        for p, claimed in claimed_parts.items():
            want = expected.get(p, [])
            n = 0
            while n < len(claimed) and n < len(want) and claimed[n] == want[n]:
                n += 1
            cut += len(claimed) - n
            keep.extend(by_id[i] for i in claimed[:n])
            if n == len(claimed):  # nothing skipped before the last row claimed: a clean claim
                self._suspect.discard(p)
        if cut:
            log.debug("left %d claimed row(s) for the next round: an earlier row of their partition was locked", cut)
        keep.sort(key=lambda r: r[ROW_ID])
        return keep

    def _blockers(self, conn: Connection, held: list[int]) -> list[Blocker]:
        """Per (topic, key) of our partitions, the earliest row that is dead or waiting out a retry backoff.

        Strict ordering holds back the rows of that (topic, key) with a higher id, and only those:
        earlier rows still go out, so requeuing the earliest dead row sends it even while later
        dead rows of its key remain (the next of them then blocks what follows it), and a dead
        row on one topic never holds back another topic's rows with the same key.
        """
        return self.dialect.blockers(conn, self.tables.outbox, held, DUE_NOW)

    def _begin_publish(self, records: list[OutboxRecord]) -> Callable[[], list[PublishResult]]:
        """Send ``records``; :meth:`_verdicts` then waits for the broker's verdicts through the function returned.

        With a publisher that has ``begin_publish`` the relay works in between; under a tracer the
        batch's send span covers the whole wait, so the publish is done before this returns.
        """
        spans = _tracing.process_spans()  # None without OpenTelemetry or a tracer provider: once per batch
        timeout = self.config.publish_timeout
        if spans is None:
            begin = self._begin()
            if begin is not None:
                return begin(records, timeout=timeout)
            results = self.publisher.publish(records, timeout=timeout)
        else:
            with spans.send_span(records, self.leases.broker_kind) as span:
                results = self.publisher.publish(records, timeout=timeout)
                _tracing.note_results(span, results)
        return lambda: results

    def _verdicts(self, records: list[OutboxRecord], wait: Callable[[], list[PublishResult]]) -> list[PublishResult]:
        """Wait for the verdicts of a batch :meth:`_begin_publish` sent: one per record."""
        results = wait()
        if len(results) != len(records):  # a broken adapter must not lose or double-mark rows
            log.error("publisher returned %d results for %d messages; retrying the batch", len(results), len(records))
            return [PublishResult(r.id, Outcome.RETRY, "publisher returned no verdict") for r in records]
        return results

    # ------------------------------------------------------------------ marking
    def _mark(self, batch: _Batch, results: list[PublishResult]) -> int:
        """Record the broker's verdicts: fence, classify, then delete/mark delivered rows, schedule
        retries and mark dead rows, all in the claim's transaction.

        The statements run as they are, with no SAVEPOINT around them (two round trips a batch).
        A permanent database error (see :mod:`outbox._dberrors`) in one of them rolls the whole
        transaction back: a new one locks the leases again (:meth:`_restart`), and the steps are
        redone there one by one, then row by row, each in a SAVEPOINT, so the delivered rows are
        still recorded and only the offending rows are marked dead: a delivered batch is never
        republished because one row could not be marked.
        """
        conn, records = batch.conn, batch.records
        lost = self._fence(conn, records)
        plan = self._classify(records, results, lost)
        steps = [*self._delivered_steps(plan), *self._retry_steps(plan), *self._dead_steps(plan)]
        error = self._run_steps(conn, steps)
        if error is not None:
            log.error("a database error no retry can fix while marking %d row(s): %s; marking them one by one",
                      sum(len(s.ids) for s in steps), _short(error))
            moved = self._restart(batch, lost)
            if moved:
                plan = self._classify(records, results, lost | moved)
                steps = [*self._delivered_steps(plan), *self._retry_steps(plan), *self._dead_steps(plan)]
            self._apply(conn, steps)
        self._after_delivered(records, plan.delivered)
        if plan.retry or plan.dead:
            self._refresh_due = True  # recompute blocked keys before the next claim
        return len(plan.delivered)

    def _run_steps(self, conn: Connection, steps: list[_Step]) -> sa.exc.DBAPIError | None:
        """Run every step as is; return a permanent error (the transaction is then to be rolled back), raise others."""
        try:
            for s in steps:
                s.run(conn, s.ids)
        except sa.exc.DBAPIError as exc:
            if not is_permanent(exc, self.dialect):
                raise  # the claim's whole transaction rolls back (the connection may be gone)
            return exc
        for s in steps:
            s.done(len(s.ids))
        return None

    def _restart(self, batch: _Batch, lost: set[int]) -> set[int]:
        """Roll the batch's transaction back after a permanent error, begin a new one and lock the
        leases again; return the batch's partitions (not already ``lost``) that are no longer this
        relay's or cannot be locked now: their rows are not marked (counted as fenced).

        The rollback also undoes what the claim wrote (delayed rows made due, undecodable rows marked
        dead): the next claim looks them up again.
        """
        batch.tx.rollback()
        batch.on_commit.clear()  # the dead marks it undid must not be counted when the new one commits
        batch.tx = batch.conn.begin()
        self._refresh_due = True
        locked = set(self.leases.lock_for_claim(batch.conn))
        moved = {r.partition for r in batch.records} - locked - lost
        if moved:
            skipped = sum(1 for r in batch.records if r.partition in moved)
            self.stats.fenced += skipped
            log.warning("partitions %s could not be locked again after the error: leaving %d published rows "
                        "pending (they may be sent twice)", _ranges(sorted(moved)), skipped)
        return moved

    def _fence(self, conn: Connection, records: list[OutboxRecord]) -> set[int]:
        """The partitions of ``records`` whose lease is no longer this relay's (their rows are not to be marked).

        Where the lease rows are really locked (``FOR UPDATE``: PostgreSQL, MySQL/MariaDB), the
        batch's own transaction locked them when it claimed (:meth:`LeaseManager.lock_for_claim`,
        again in :meth:`_resume` for a batch claimed ahead) and checked owner and generation then.
        Nobody can take a lease over or bump its generation without that lock, so the check is still
        true now and a second statement would find nothing: the lock is the fence. (If the database
        ended the transaction meanwhile, the marking or the commit fails and nothing is marked.)
        Elsewhere (SQLite), the leases are read again in this transaction.
        """
        if self.dialect.supports_skip_locked:
            return set()
        lost = self.leases.fence(conn, {r.partition for r in records})
        if lost:
            skipped = [r for r in records if r.partition in lost]
            self.stats.fenced += len(skipped)
            log.warning("partitions %s moved to another relay during the batch: leaving %d published rows "
                        "to their new owner (they may be sent twice)", _ranges(sorted(lost)), len(skipped))
        return lost

    def _classify(self, records: list[OutboxRecord], results: list[PublishResult], lost: set[int]) -> _MarkPlan:
        """Sort the verdicts into delivered rows, retries (by reason and attempts) and dead rows (by reason)."""
        by_id = {r.id: r for r in records}
        plan = _MarkPlan()
        failed_keys: dict[str, int] = {}
        for res in results:
            rec = by_id.get(res.id)
            if rec is None or rec.partition in lost:
                continue
            if res.held:  # never sent: stays pending, untouched, behind the failed message
                continue
            if res.outcome is Outcome.DELIVERED:
                plan.delivered.append(rec)
                if rec.key is not None and rec.key in failed_keys and self.config.ordering == "strict":
                    log.warning("key %r: message %s went out although earlier message %s failed in the same "
                                "batch", rec.key, rec.message_id, failed_keys[rec.key])
                continue
            reason = _short(res.error or res.outcome.value)
            if rec.key is not None:
                failed_keys.setdefault(rec.key, rec.id)
            if res.outcome is Outcome.FAILED or rec.attempts + 1 >= self.config.max_attempts:
                if res.outcome is Outcome.RETRY:
                    reason = f"gave up after {rec.attempts + 1} attempts: {reason}"
                plan.dead[reason].append(res.id)
            else:
                plan.retry[(reason, rec.attempts)].append(res.id)
        return plan

    def _delivered_steps(self, plan: _MarkPlan) -> list[_Step]:
        o = self.tables.outbox
        ids = [r.id for r in plan.delivered]
        if self.config.delete_published:
            def delete(conn: Connection, chunk: list[int]) -> None:
                self.dialect.delete_ids(conn, o, chunk)

            return [_Step(chunk, delete, "published, but the row could not be deleted", delivered=True)
                    for chunk in _chunks(ids, 1000)]
        now = _now()

        def mark_published(conn: Connection, chunk: list[int]) -> None:
            self.dialect.update_ids(conn, o, chunk, {"status": STATUS_PUBLISHED, "published_at": now})

        return [_Step(chunk, mark_published, "published, but the row could not be marked published", delivered=True)
                for chunk in _chunks(ids, 1000)]

    def _retry_steps(self, plan: _MarkPlan) -> list[_Step]:
        o = self.tables.outbox
        now = _now()
        steps = []
        for (reason, attempts), ids in plan.retry.items():
            delay = self._backoff(attempts)
            values = {"attempts": o.c.attempts + 1, "last_error": reason,
                      "available_at": now + dt.timedelta(seconds=delay)}

            def retry(conn: Connection, chunk: list[int], values: dict[str, Any] = values) -> None:
                conn.execute(o.update().where(o.c.id.in_(chunk)).values(**values))

            def done(n: int, reason: str = reason, delay: float = delay) -> None:
                self.stats.retried += n
                log.warning("%d message(s) not delivered, retrying in %.1f s: %s", n, delay, reason)

            steps.append(_Step(ids, retry, f"not delivered ({reason}), and the retry could not be recorded",
                               done=done))
        return steps

    def _dead_steps(self, plan: _MarkPlan) -> list[_Step]:
        o = self.tables.outbox
        steps = []
        for reason, ids in plan.dead.items():
            def dead(conn: Connection, chunk: list[int], reason: str = reason) -> None:
                conn.execute(o.update().where(o.c.id.in_(chunk)).values(
                    attempts=o.c.attempts + 1, last_error=reason, status=STATUS_DEAD))

            def done(n: int, reason: str = reason) -> None:
                self.stats.dead += n
                log.error("%d message(s) marked dead (see `outbox dead list`): %s", n, reason)

            steps.append(_Step(ids, dead, reason, done=done))
        return steps

    def _apply(self, conn: Connection, steps: list[_Step]) -> None:
        """Run ``steps`` one by one, each in a SAVEPOINT; a step that fails, row by row (see :meth:`_mark`)."""
        for s in steps:
            if self._attempt(conn, lambda s=s: s.run(conn, s.ids)) is None:  # type: ignore[misc]
                s.done(len(s.ids))
                continue
            ok = 0
            for rid in s.ids:
                err = self._attempt(conn, lambda rid=rid, s=s: s.run(conn, [rid]))  # type: ignore[misc]
                if err is None:
                    ok += 1
                else:
                    self._give_up_row(conn, rid, f"{s.what}: {_short(err)}", delivered=s.delivered)
            if ok:
                s.done(ok)

    def _attempt(self, conn: Connection, fn: Callable[[], object]) -> sa.exc.DBAPIError | None:
        """Run ``fn`` in a SAVEPOINT; return a permanent error (rolled back to the savepoint), raise others."""
        self.dialect.ensure_transaction(conn)  # a first SAVEPOINT must not begin (and its RELEASE commit) it
        savepoint = conn.begin_nested()
        try:
            fn()
        except sa.exc.DBAPIError as exc:
            if not is_permanent(exc, self.dialect):
                raise  # the claim's whole transaction rolls back (the connection may be gone)
            savepoint.rollback()
            return exc
        savepoint.commit()
        return None

    def _give_up_row(self, conn: Connection, rid: int, reason: str, *, delivered: bool = False,
                     on_commit: list[Callable[[], None]] | None = None) -> None:
        """Mark one row dead with ``reason`` (a minimal update); if even that fails, never claim it again here.

        ``on_commit``: count and log the dead row only when the transaction commits (appended there),
        not now: a claim made ahead may be rolled back, and the next claim marks the row dead again.
        """
        o = self.tables.outbox
        reason = _short(reason)
        err = self._attempt(conn, lambda: self.dialect.update_ids(
            conn, o, [rid], {"status": STATUS_DEAD, "last_error": reason}))
        if err is None:
            def done() -> None:
                self.stats.dead += 1
                log.error("row %d marked dead (see `outbox dead list`): %s", rid, reason)

            if on_commit is None:
                done()
            else:
                on_commit.append(done)
            return
        self._unmarkable[rid] = delivered
        log.error("row %d cannot be updated at all (%s); this relay will not claim it again until it restarts. "
                  "Fix or delete the row by hand. It was: %s", rid, _short(err), reason)

    def _after_delivered(self, records: list[OutboxRecord], delivered: list[OutboxRecord]) -> None:
        if not delivered:
            return
        for rec in delivered:
            if rec.id > self._after.get(rec.partition, 0):
                self._after[rec.partition] = rec.id
        self.stats.published += len(delivered)
        if self.on_published is not None:
            self.on_published(delivered)

    # ------------------------------------------------------------------ undecodable rows
    def _decode(self, conn: Connection, rows: Sequence[Any], on_commit: list[Callable[[], None]]) -> list[OutboxRecord]:
        """Claimed rows as records; rows that cannot be decoded are marked dead here (same transaction),
        counted and logged by ``on_commit`` once it commits.

        In strict ordering, later claimed rows of a dead row's (topic, key) stay pending, untouched,
        behind it; rows this relay could not mark at all are left out.
        """
        records: list[OutboxRecord] = []
        bad: list[tuple[int, str]] = []
        held_back: set[tuple[Any, Any]] = set()
        strict = self.config.ordering == "strict"
        unmarkable, as_text = self._unmarkable, self.dialect.json_as_text
        for r in rows:  # claimed rows, indexed by position (ROW_ID ...)
            if unmarkable and r[ROW_ID] in unmarkable:
                if strict and not unmarkable[r[ROW_ID]] and isinstance(r[ROW_KEY], str):
                    held_back.add((r[ROW_TOPIC], r[ROW_KEY]))
                continue
            if held_back and (r[ROW_TOPIC], r[ROW_KEY]) in held_back:
                continue
            try:
                records.append(decode_row(r, json_as_text=as_text))
            except RowError as exc:
                bad.append((r[ROW_ID], _short(str(exc))))
                if strict and isinstance(r[ROW_KEY], str):
                    held_back.add((r[ROW_TOPIC], r[ROW_KEY]))
        for rid, reason in bad:
            self._give_up_row(conn, rid, reason, on_commit=on_commit)
        if bad or held_back:
            self._refresh_due = True
        return records

    def _log_loop_error(self, exc: BaseException, delay: float) -> None:
        if isinstance(exc, BrokerUnavailable):
            log.error("broker unavailable (publisher): %s; retrying in %.1f s", _short(exc), delay)
        elif is_permanent(exc, self.dialect):  # not an outage: say so, rather than "unavailable"
            log.error("database error on %s that a retry may not fix (not an outage): %s; retrying in %.1f s",
                      self.db_label, _short(exc), delay)
        else:
            log.error("database unavailable (%s): %s; retrying in %.1f s", self.db_label, _short(exc), delay)

    def _backoff(self, attempts: int) -> float:
        base = min(self.config.backoff_max, self.config.backoff_initial * (2 ** min(attempts, 30)))
        return base * random.uniform(0.5, 1.0)

    # ------------------------------------------------------------------ helpers
    def _maybe_rebalance(self, *, overdue_only: bool = False) -> None:
        """Renew the membership row and the leases and rebalance them (one transaction), when due.

        ``overdue_only``: only if the renewal is :data:`RENEW_GRACE` renew intervals late. The loop
        renews while it is about to wait for work (:meth:`_sleep`, no wake-up pending), so the
        renewal is not in the path of a batch that a wake-up announced; when wake-ups keep coming
        with no such moment, it renews before the next claim once overdue (still well inside the
        lease TTL: three renew intervals).
        """
        since = time.monotonic() - self._last_rebalance
        if since >= self.config.renew_interval * (RENEW_GRACE if overdue_only else 1.0):
            self.leases.heartbeat()
            self._last_rebalance = time.monotonic()
            self._sweep_unclaimable()
            self._maintain_partitions()

    def _maintain_partitions(self) -> None:
        """Partitioned retention layout: keep the coming days' partitions created (at start, then hourly).

        Never stops the relay: a failure is logged and tried again the next hour (the archive's
        default partition takes the rows of a day nobody created ahead).
        """
        mono = time.monotonic()
        if mono - self._last_partitions < PARTITIONS_INTERVAL:
            return
        self._last_partitions = mono
        try:
            self.dialect.maintain_partitions(self.engine, self.tables)
        except Exception as exc:
            log.warning("could not create the retention layout's partitions ahead (retried in %.0f s): %s",
                        PARTITIONS_INTERVAL, mask_secrets(exc))

    def _sweep_unclaimable(self, *, force: bool = False) -> None:
        """Mark dead the rows no claim can reach (partition out of range, unknown status), with the reason.

        At most every SWEEP_INTERVAL seconds, a bounded number of rows, through indexed reads only.
        """
        mono = time.monotonic()
        if not force and mono - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = mono
        o = self.tables.outbox
        held = sorted(self.leases.held)
        with self.engine.begin() as conn:
            found = unclaimable_rows(conn, o, held, self.leases.partition_count,
                                     timestamp=self.dialect.readable_timestamp)
            for rid, was, reason in found:
                # only if the row still is as found: an operator may have fixed it meanwhile
                still = (v if isinstance(v, sa.ColumnElement) else o.c[k] == v for k, v in was.items())
                n = conn.execute(o.update().where(o.c.id == rid, *still)
                                 .values(status=STATUS_DEAD, last_error=reason)).rowcount
                if n:
                    self.stats.dead += 1
                    log.error("%s; marked dead (see `outbox dead list`)", reason)
            overdue = overdue_rows(conn, o, held, DUE_NOW) if held else []
            for chunk in _chunks(overdue, 1000):  # by id, as _promote does (no InnoDB range lock)
                self.dialect.update_ids(conn, o, chunk, {"available_at": DUE_NOW})
            if overdue:
                log.warning("%d pending row(s) had an available_at before 1970 (written by hand?): made due now",
                            len(overdue))
        if found or overdue:
            self._refresh_due = True

    def _sleep(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a wake-up (or stop), serving the publisher; ``True`` if a wake-up ended it."""
        end = time.monotonic() + seconds
        while not self._stop.is_set():
            self._idle_publisher()
            left = end - time.monotonic()
            if left <= 0:
                return False
            # wake early for NOTIFY, stop(), or the lease renewal deadline
            until_renew = self._last_rebalance + self.config.renew_interval - time.monotonic()
            until_renew = until_renew if self._started else left  # not started (backing off): no leases to renew
            chunk = min(left, until_renew, IDLE_SERVICE)  # serve the publisher at least every IDLE_SERVICE s
            if self._wake.wait(max(0.0, chunk)):
                self._wake.clear()
                return True
            if until_renew <= chunk:
                return False
        return False

    def _idle_publisher(self) -> None:
        """Let the publisher serve its connection (heartbeats, delivery reports) while there is nothing to send."""
        idle = getattr(self.publisher, "idle", None)  # optional in the Publisher protocol
        if idle is None:
            return
        try:
            idle(0.0)
        except Exception as exc:  # an adapter's idle() must not stop the relay
            log.warning("the publisher failed while idle: %s", _short(exc))

    def _progress(self) -> None:
        every = self.config.progress_interval
        if every <= 0:
            return
        now = time.monotonic()
        if now - self._last_progress >= every:
            # the rate over the time the work took, not the whole interval: a 1 s burst reads as its own rate
            sent = self.stats.published - self._progress_mark
            rate = sent / self._busy if self._busy > 0 else 0.0
            if sent or self.stats.retried or self.stats.dead:
                log.info("published %d (+%d in %.2f s busy: %.0f msg/s), retried %d, dead %d; partitions %s",
                         self.stats.published, sent, self._busy, rate, self.stats.retried, self.stats.dead,
                         _ranges(list(self.leases.held)))
            self._last_progress = now
            self._progress_mark = self.stats.published
            self._busy = 0.0

    def _summary(self) -> str:
        s = self.stats
        return f"published {s.published}, retried {s.retried}, dead {s.dead}, fenced {s.fenced}, errors {s.errors}"

    def _dispose_quietly(self) -> None:
        try:
            self.engine.dispose()
        except Exception:
            pass


class _Batch:
    """One claimed batch and the transaction (on its own connection) that holds its row locks."""

    def __init__(self, conn: Connection, tx: Any, held: list[int]) -> None:
        self.conn = conn
        self.tx = tx
        self.held = held
        """the partitions whose lease rows the claim's transaction locked (or relies on being locked)"""
        self.records: list[OutboxRecord] = []
        self.claimed_at = 0.0
        self.on_commit: list[Callable[[], None]] = []
        """run once the transaction committed (counts and log lines of what it changed); dropped on rollback"""

    def end(self, *, commit: bool) -> None:
        try:
            if commit:
                self.tx.commit()
            else:
                self.tx.rollback()
        finally:
            self.conn.close()
        if commit:
            done, self.on_commit = self.on_commit, []
            for fn in done:
                fn()

    def abort(self, exc: BaseException) -> BaseException:
        """Roll back after ``exc``; return the rollback's own error if it failed (the session is gone), else ``exc``."""
        try:
            self.end(commit=False)
        except sa.exc.DBAPIError as err:
            return err
        return exc

    def abandon(self) -> None:
        """Roll back unpublished, never raising (a batch claimed ahead that is not to be sent)."""
        try:
            self.end(commit=False)
        except Exception as exc:
            log.debug("rolling back a batch claimed ahead failed: %s", _short(exc))


class _StaleBatch(Exception):
    """Raised inside a claim's transaction to roll it back: the batch is too old to publish."""

    def __init__(self, age: float, rows: int) -> None:
        super().__init__(f"claimed {age:.1f} s ago")
        self.age = age
        self.rows = rows


def _stale_in(exc: BaseException) -> _StaleBatch | None:
    """The :class:`_StaleBatch` that ``exc`` is, or that was being handled when ``exc`` was raised."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, _StaleBatch):
            return cur
        cur = cur.__context__
        seen += 1
    return None


@dataclass
class _MarkPlan:
    """One batch's verdicts, sorted for marking."""

    delivered: list[OutboxRecord] = field(default_factory=list)
    retry: dict[tuple[str, int], list[int]] = field(default_factory=lambda: defaultdict(list))
    dead: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class _Step:
    """One marking statement over ``ids``; ``what`` is the reason a row gets if it alone fails it."""

    ids: list[int]
    run: Callable[[Connection, list[int]], None]
    what: str
    done: Callable[[int], None] = lambda n: None
    delivered: bool = False


def _check_codec(publisher: Publisher, config: RelayConfig) -> None:
    """A config that names a codec must match the publisher's (the publisher owns the wire format)."""
    codec = getattr(publisher, "codec", None)
    name = getattr(codec, "name", None)
    if config.codec != "native" and name is not None and name != config.codec:
        raise ConfigurationError(f"the relay config says codec {config.codec!r} but the publisher encodes with "
                                 f"{name!r}: build the publisher with codec={config.codec!r}")


def _publisher_kind(publisher: Publisher) -> str:
    publisher = getattr(publisher, "inner", publisher)  # a decorator (outbox.observability.MetricsPublisher)
    name = type(publisher).__name__
    return (name[: -len("Publisher")] if name.endswith("Publisher") and name != "Publisher" else name).lower()


class _RetryState:
    """The bit of tenacity's RetryCallState that its wait strategies read."""

    def __init__(self, attempt: int) -> None:
        self.attempt_number = attempt


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _short(exc: object) -> str:
    text = mask_secrets(exc if not isinstance(exc, BaseException) else f"{type(exc).__name__}: {exc}")
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 3] + "..."


def _chunks(items: list[int], n: int) -> list[list[int]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


