"""Partition leases: how several relays share the outbox table without stepping on each other.

Each relay registers itself in the relays table and renews that row. The outbox's partitions are
split fairly among the live relays (about P/N each, decided the same way by every relay from the
sorted list of live relay ids). A relay holds a partition through a lease row with an owner, an
expiry and a fencing ``generation`` that goes up on every change of owner. Taking a lease is a
compare-and-set on (partition, generation), so two relays can never both win it; marking rows
after a publish re-checks the generation in the same transaction (see :meth:`LeaseManager.fence`),
so a relay whose lease lapsed can never touch rows that another relay now owns. And a claim locks
its lease rows for the whole claim-publish-mark transaction (:meth:`LeaseManager.lock_for_claim`),
which a takeover must wait out, so a relay paused mid-batch is never overtaken by a new owner.
That wait is bounded: the relay's own sessions end when idle in a transaction for longer than
``RelayConfig.idle_transaction_timeout`` (``publish_timeout + lease_ttl``; set per dialect by
:meth:`~outbox.dialects.Dialect.relay_engine`), which releases a frozen relay's locks, and a relay
that wakes with a batch claimed too long ago drops it unpublished (``Relay.run_once``).

Membership (:meth:`LeaseManager.join`, :meth:`LeaseManager.register`):

- A relays row belongs to one process *instance* (a random id). A relay whose id is held by a live
  other instance (its heartbeat keeps advancing) refuses to start (:class:`DuplicateRelay`); a row
  left by a crashed incarnation is waited out until it expires, or taken over at once when it is
  on this host and its pid is gone. A running relay that finds its row rewritten by another
  instance stops (:class:`DuplicateRelay`).
- On a database that runs a single relay (SQLite), a second relay waits as a standby until the
  running one stops or its row expires (at once if it is on this host and its pid is gone).
- Relays form *groups* (``RelayConfig.group``). Each group leases every partition on its own
  (lease rows are keyed by (group, partition)) and claims only the rows of its topics. The relays
  of a group must publish to one broker with the same topic patterns, and two groups' topics must
  not overlap; otherwise one stream would be split, and the relay refuses to start
  (:class:`RelayGroupConflict`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .dialects import Dialect
from .errors import DuplicateRelay, LeaseLost, RelayGroupConflict, SingleRelayOnly
from .schema import ALL_TOPICS, DEFAULT_GROUP, OutboxTables

__all__ = ["LeaseManager", "default_relay_id", "topics_overlap"]

log = logging.getLogger("outbox.relay")

#: instances of relays joined in this process (so a row with our own pid is known live or dead)
_LIVE_INSTANCES: set[str] = set()
#: seconds between "standby"/"waiting" log lines while a relay waits to join
WAIT_LOG_INTERVAL = 30.0


def default_relay_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def topics_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two lists of topic patterns (exact names, prefixes ending in ``*``) share a topic."""
    for x in a:
        for y in b:
            px, py = x.endswith("*"), y.endswith("*")
            if px and py:
                if x[:-1].startswith(y[:-1]) or y[:-1].startswith(x[:-1]):
                    return True
            elif px:
                if y.startswith(x[:-1]):
                    return True
            elif py:
                if x.startswith(y[:-1]):
                    return True
            elif x == y:
                return True
    return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@dataclass
class LeaseManager:
    engine: Engine
    tables: OutboxTables
    dialect: Dialect
    relay_id: str
    ttl: float
    min_partitions: int
    group: str = DEFAULT_GROUP
    topics: tuple[str, ...] = (ALL_TOPICS,)
    broker_kind: str | None = None
    broker_target: str | None = None
    """where this relay publishes: host:port list or vhost, never credentials"""
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    """random id of this relay object: tells this process's row from another one's with the same id"""
    held: dict[int, int] = field(default_factory=dict)
    """partition -> generation this relay holds it under."""
    partition_count: int = 0
    acquired_at: dict[int, float] = field(default_factory=dict)
    """partition -> monotonic time this relay took it over from a relay whose lease lapsed (for logs
    and tests; ordering no longer depends on it: see :meth:`lock_for_claim`)."""
    joined: bool = False
    _joined_before: bool = field(default=False, init=False, repr=False)  # joined once: later joins log at DEBUG
    started_at: dt.datetime | None = None
    inherited: bool = False
    """this relay took over the row of an earlier incarnation with the same id: its leases count as takeovers"""
    _lock_stmt: tuple[tuple[int, ...], Any] | None = field(default=None, init=False, repr=False)
    """(partitions, statement) of :meth:`lock_for_claim`, reused while the partitions are the same"""

    # ---------------------------------------------------------------- membership
    @property
    def topics_text(self) -> str:
        return ",".join(self.topics)

    def join(self, stop: threading.Event | None = None) -> bool:
        """Register this relay at start, waiting as long as another relay keeps it out.

        Returns False if ``stop`` was set while waiting. Raises :class:`DuplicateRelay` when a live
        other process holds this relay id, :class:`RelayGroupConflict` when a live relay would split
        this relay's topics. Waits (saying for what) for a crashed incarnation's row to expire, and,
        on a single-relay database, as a standby while another relay runs.
        """
        stop = stop or threading.Event()
        seen: tuple[Any, ...] | None = None
        last_log = 0.0
        poll = min(1.0, max(0.1, self.ttl / 10))
        while not stop.is_set():
            now = _now()
            try:
                with self.engine.begin() as conn:
                    self._cleanup(conn, now)  # a write first: on SQLite it takes the write lock, so the reads agree
                    blocker = self._blocker(conn, now)
                    if blocker is None:
                        started = self.started_at
                        self.started_at = started or now
                        try:
                            self._write_row(conn, now)
                            self._check_conflicts(conn, now, running=False)
                        except BaseException:
                            self.started_at = started
                            raise
                        self.joined = True
                        _LIVE_INSTANCES.add(self.instance)
                        # once at INFO: a relay that rejoins after each failed broker connect says so at DEBUG
                        log.log(logging.DEBUG if self._joined_before else logging.INFO,
                                "relay %s joined relay group %s (topics %s, broker %s)", self.relay_id, self.group,
                                self.topics_text, " ".join(filter(None, (self.broker_kind, self.broker_target))))
                        self._joined_before = True
                        return True
            except sa.exc.IntegrityError:  # another process inserted this relay id at the same moment
                continue
            same_id = blocker.relay_id == self.relay_id
            if same_id and self.joined:
                # we were running (this is a re-join after a database error, e.g. the server ended
                # the session of this frozen process) and another process took our row meanwhile
                self._leave_local()
                raise DuplicateRelay(self._taken_over(blocker))
            who = f"relay {blocker.relay_id} (pid {blocker.pid} on {blocker.hostname})"
            if self._is_dead(blocker) and self._evict(blocker):
                log.warning("%s is gone (no such process on this host): taking over at once", who)
                continue
            state = (blocker.instance, blocker.heartbeat_at)
            if same_id and seen is not None and seen != state:
                msg = (f"relay id {self.relay_id!r} is in use by another live relay (pid {blocker.pid} on "
                       f"{blocker.hostname}): its heartbeat keeps advancing. Give each relay its own --relay-id "
                       "(or leave it out for a unique default)")
                log.error("%s", msg)
                raise DuplicateRelay(msg)
            seen = state
            left = max(0.0, (blocker.expires_at - now).total_seconds())
            ago = max(0.0, (now - blocker.heartbeat_at).total_seconds())
            mono = time.monotonic()
            if mono - last_log >= WAIT_LOG_INTERVAL:
                last_log = mono
                if same_id:
                    log.warning("relay id %s is held by an earlier process: waiting up to %.0f s for %s to expire: "
                                "its last heartbeat was %.1f s ago", self.relay_id, left, who, ago)
                else:
                    log.warning("standby: %s is running on this %s database, which supports a single relay; "
                                "waiting until it stops or its lease expires (up to %.0f s from now unless it "
                                "renews; its last heartbeat was %.1f s ago)", who, self.dialect.name, left, ago)
            stop.wait(min(poll, left + 0.05) if left > 0 else poll)
        return False

    def register(self) -> None:
        """Renew this relay's row (a heartbeat); raise if another relay has taken its place.

        Raises :class:`DuplicateRelay` when the row was rewritten by another process with the same
        relay id, :class:`SingleRelayOnly` when, on a single-relay database, another relay took over
        while this one was silent, :class:`RelayGroupConflict` when a relay that joined earlier would
        have its topics split by this one. The caller must stop claiming.
        """
        if not self.joined:
            return
        with self.engine.begin() as conn:
            self._register(conn, _now())

    def heartbeat(self) -> None:
        """:meth:`register`, :meth:`ensure_partitions` and :meth:`rebalance` in ONE transaction.

        The relay's periodic renewal: one commit (one WAL flush) instead of three, so the pause
        it puts between two claims is a third of what the three transactions took. Raises what
        :meth:`register` raises (and then nothing of the three is written).
        """
        with self.engine.begin() as conn:
            now = _now()
            if self.joined:
                self._register(conn, now)
            self._ensure_partitions(conn)
            self._rebalance(conn, now)

    def _register(self, conn: Connection, now: dt.datetime) -> None:
        r = self.tables.relays
        self._cleanup(conn, now)  # a write first: on SQLite it takes the write lock, so the reads agree
        row = conn.execute(sa.select(r).where(r.c.relay_id == self.relay_id)).first()
        if row is not None and row.instance != self.instance:
            self._leave_local()
            raise DuplicateRelay(self._taken_over(row))
        lapsed = row is None or row.expires_at <= now
        if not self.dialect.supports_concurrent_relays:
            other = conn.execute(
                sa.select(r.c.relay_id, r.c.hostname, r.c.pid)
                .where(r.c.relay_id != self.relay_id, r.c.expires_at > now)
            ).first()
            if other is not None and lapsed:
                self._leave_local()
                msg = (f"relay {other.relay_id} (pid {other.pid} on {other.hostname}) took over this "
                       f"{self.dialect.name} database, which supports a single relay, while this relay was not "
                       "renewing its lease; stopping this one")
                log.error("%s", msg)
                raise SingleRelayOnly(msg)
        self._write_row(conn, now, renew=row is not None)
        self._check_conflicts(conn, now, running=True)

    def _taken_over(self, row: Any) -> str:
        """Log and return why this running relay stops: ``row`` (its id's row) is another process's now."""
        msg = (f"relay id {self.relay_id!r} was taken over by another process (pid {row.pid} on "
               f"{row.hostname}) while this relay was running: two relays share this id. Stopping this "
               "one; give each relay its own --relay-id")
        log.error("%s", msg)
        return msg

    def unregister(self) -> None:
        r = self.tables.relays
        self._leave_local()
        with self.engine.begin() as conn:
            conn.execute(r.delete().where(r.c.relay_id == self.relay_id, r.c.instance == self.instance))

    def _leave_local(self) -> None:
        self.joined = False
        _LIVE_INSTANCES.discard(self.instance)

    def _cleanup(self, conn: Connection, now: dt.datetime) -> None:
        # long-expired members are removed so `outbox status` stays readable
        r = self.tables.relays
        conn.execute(r.delete().where(r.c.expires_at < now - dt.timedelta(seconds=self.ttl * 4),
                                      r.c.relay_id != self.relay_id))

    def _blocker(self, conn: Connection, now: dt.datetime) -> Any:
        """The live row that keeps this relay from joining: its own id held by another process, or
        (single-relay databases) any other live relay. ``None`` if there is none."""
        r = self.tables.relays
        mine = conn.execute(sa.select(r).where(r.c.relay_id == self.relay_id)).first()
        if mine is not None and mine.instance != self.instance and mine.expires_at > now:
            return mine
        if not self.dialect.supports_concurrent_relays:
            return conn.execute(
                sa.select(r).where(r.c.relay_id != self.relay_id, r.c.expires_at > now).order_by(r.c.relay_id)
            ).first()
        return None

    def _is_dead(self, row: Any) -> bool:
        """A relay row on this host whose process is gone (the pid is not running, or is ours and the
        instance is not one of this process's relays)."""
        if row.hostname != socket.gethostname():
            return False
        if row.pid == os.getpid():
            return row.instance not in _LIVE_INSTANCES
        return not _pid_alive(int(row.pid))

    def _evict(self, row: Any) -> bool:
        """Remove the row of a dead relay and free its leases (compare-and-set on its heartbeat).

        False if the row changed meanwhile (it renewed: not dead after all)."""
        r, le = self.tables.relays, self.tables.leases
        with self.engine.begin() as conn:
            gone = conn.execute(r.delete().where(
                r.c.relay_id == row.relay_id, r.c.heartbeat_at == row.heartbeat_at,
                r.c.instance.is_(None) if row.instance is None else r.c.instance == row.instance,
            )).rowcount
            if gone and row.relay_id != self.relay_id:
                conn.execute(le.update().where(le.c.owner == row.relay_id).values(owner=None, expires_at=None))
            if gone and row.relay_id == self.relay_id:
                self.inherited = True
        return bool(gone)

    def _write_row(self, conn: Connection, now: dt.datetime, renew: bool = False) -> None:
        r = self.tables.relays
        exp = now + dt.timedelta(seconds=self.ttl)
        if renew:
            conn.execute(r.update().where(r.c.relay_id == self.relay_id, r.c.instance == self.instance)
                         .values(heartbeat_at=now, expires_at=exp))
            return
        values = dict(
            hostname=socket.gethostname(), pid=os.getpid(), started_at=self.started_at or now, heartbeat_at=now,
            expires_at=exp,
            instance=self.instance, relay_group=self.group, broker_kind=self.broker_kind,
            broker_target=self.broker_target, topics=self.topics_text,
        )
        previous = conn.execute(sa.select(r.c.instance).where(r.c.relay_id == self.relay_id)).first()
        if previous is None:
            conn.execute(r.insert().values(relay_id=self.relay_id, **values))
            return
        if previous.instance != self.instance:  # an expired row of an earlier incarnation
            self.inherited = True
            log.info("relay id %s: taking over the expired row of an earlier process", self.relay_id)
        conn.execute(r.update().where(r.c.relay_id == self.relay_id).values(**values))

    def _check_conflicts(self, conn: Connection, now: dt.datetime, *, running: bool) -> None:
        """Raise :class:`RelayGroupConflict` if a live relay would split this relay's topics.

        At start any conflicting live relay counts; while running only one that joined earlier
        (two relays that started at the same moment both refuse, and are told why).
        """
        r = self.tables.relays
        others = conn.execute(sa.select(r).where(r.c.relay_id != self.relay_id, r.c.expires_at > now)
                              .order_by(r.c.started_at, r.c.relay_id)).all()
        me = (self.started_at or now, self.instance)
        for o in others:
            if running and (o.started_at, o.instance or "") > me:
                continue  # it joined after us: it is the one to refuse
            problem = self._conflict_with(o)
            if problem is None:
                continue
            if running:
                self._leave_local()
            msg = f"relay {o.relay_id} (pid {o.pid} on {o.hostname}) {problem}"
            if running:
                msg += "; stopping this relay"
            log.error("%s", msg)
            raise RelayGroupConflict(msg)

    def _conflict_with(self, o: Any) -> str | None:
        theirs = tuple((o.topics or ALL_TOPICS).split(","))
        where = f"{o.broker_kind or 'an unknown broker'} {o.broker_target or ''}".strip()
        mine_where = f"{self.broker_kind or 'an unknown broker'} {self.broker_target or ''}".strip()
        if o.relay_group == self.group:
            # compared where both relays said (a relay built in code may not name its target)
            kinds_differ = None not in (o.broker_kind, self.broker_kind) and o.broker_kind != self.broker_kind
            targets_differ = (None not in (o.broker_target, self.broker_target)
                              and o.broker_target != self.broker_target)
            if kinds_differ or targets_differ:
                return (f"in relay group {self.group!r} publishes to {where}, this relay to {mine_where}: the "
                        "group's partitions would be split between two brokers. Give this relay its own group "
                        "with topics of its own (--group NAME --topics PATTERN,...), or the group's broker")
            if sorted(theirs) != sorted(self.topics):
                return (f"in relay group {self.group!r} publishes topics {','.join(theirs)}, this relay "
                        f"{self.topics_text}: all relays of a group must be given the same --topics")
            return None
        if topics_overlap(theirs, self.topics):
            return (f"of relay group {o.relay_group!r} publishes topics {','.join(theirs)} to {where}, which "
                    f"overlap this relay's {self.topics_text} (group {self.group!r}): both groups would claim the "
                    "same rows and split their streams. Give the groups disjoint --topics (the default, *, "
                    "overlaps every other group)")
        return None

    # ---------------------------------------------------------------- partitions
    def ensure_partitions(self) -> int:
        """Make sure a lease row exists for every partition writers use; return the count."""
        with self.engine.begin() as conn:
            return self._ensure_partitions(conn)

    def _ensure_partitions(self, conn: Connection) -> int:
        o, le = self.tables.outbox, self.tables.leases
        highest = conn.execute(sa.select(sa.func.max(o.c.partition)).where(o.c.partition <= 32767)).scalar()
        have = conn.execute(sa.select(sa.func.count()).select_from(le).where(self._mine(le))).scalar_one()
        wanted = max(self.min_partitions, (highest + 1) if highest is not None else 0, have)
        if have < wanted:
            existing = set(conn.execute(sa.select(le.c.partition).where(self._mine(le))).scalars())
            missing = [{"relay_group": self.group, "partition": p, "generation": 0}
                       for p in range(wanted) if p not in existing]
            if missing:
                conn.execute(self.dialect.insert_ignore(le), missing)
        self.partition_count = wanted
        return wanted

    def rebalance(self) -> None:
        """Renew held leases, give back partitions over the fair share, take free ones up to it."""
        if not self.joined:  # stopped while waiting to join: hold nothing
            return
        with self.engine.begin() as conn:
            self._rebalance(conn, _now())

    def _rebalance(self, conn: Connection, now: dt.datetime) -> None:
        if not self.joined:
            return
        exp = now + dt.timedelta(seconds=self.ttl)
        le, r = self.tables.leases, self.tables.relays
        live = sorted(conn.execute(sa.select(r.c.relay_id).where(
            r.c.expires_at > now, r.c.relay_group == self.group)).scalars())
        if self.relay_id not in live:
            live = sorted([*live, self.relay_id])
        total = self.partition_count
        rank = live.index(self.relay_id)
        target = total // len(live) + (1 if rank < total % len(live) else 0)
        if not self.dialect.supports_concurrent_relays:
            target = total
        self._renew(conn, exp)
        if len(self.held) > target:
            extra = sorted(self.held)[target:]
            for p in extra:
                conn.execute(
                    le.update()
                    .where(self._mine(le), le.c.partition == p, le.c.owner == self.relay_id,
                           le.c.generation == self.held[p])
                    .values(owner=None, expires_at=None)
                )
                del self.held[p]
            log.info("released partitions %s (fair share is %d of %d for %d relays)",
                     _ranges(extra), target, total, len(live))
        elif len(self.held) < target:
            want = target - len(self.held)
            q = (
                sa.select(le.c.partition, le.c.generation, le.c.owner)
                .where(sa.or_(le.c.owner.is_(None), le.c.expires_at < now, le.c.owner == self.relay_id))
                .where(self._mine(le), le.c.partition < total)
                .order_by(le.c.partition)
                .limit(want + len(self.held))
            )
            gained = []
            for p, gen, previous in conn.execute(self.dialect.lock_rows(q)).all():
                if p in self.held or len(gained) >= want:
                    continue
                took = conn.execute(
                    le.update()
                    .where(self._mine(le), le.c.partition == p, le.c.generation == gen)
                    .where(sa.or_(le.c.owner.is_(None), le.c.expires_at < now, le.c.owner == self.relay_id))
                    .values(owner=self.relay_id, generation=gen + 1, expires_at=exp)
                ).rowcount
                if took:
                    self.held[p] = gen + 1
                    # taken over from a lapsed relay, or from an earlier process with this relay id
                    if previous is not None and (previous != self.relay_id or self.inherited):
                        self.acquired_at[p] = time.monotonic()
                    gained.append(p)
            if gained:
                log.info("took partitions %s (now %d of %d, %d relays)", _ranges(gained), len(self.held),
                         total, len(live))

    def _renew(self, conn: Connection, exp: dt.datetime) -> None:
        """Extend every held lease that is still this relay's, in one UPDATE; drop the others from :attr:`held`.

        A lease counts as still held only with the owner AND the generation this relay took it
        with (a takeover bumps the generation). One statement whatever the partition count: this
        runs between two rounds and holds the next claim up.
        """
        if not self.held:
            return
        le = self.tables.leases
        pairs = sorted(self.held.items())
        still = sa.and_(self._mine(le), le.c.owner == self.relay_id,
                        sa.tuple_(le.c.partition, le.c.generation).in_(pairs))
        renew = le.update().where(still).values(expires_at=exp)
        if conn.dialect.update_returning:  # one round trip: the leases still ours come back
            kept = set(conn.execute(renew.returning(le.c.partition)).scalars())
        elif conn.execute(renew).rowcount == len(pairs):  # matched rows (FOUND_ROWS on MySQL)
            kept = set(self.held)
        else:
            kept = set(conn.execute(sa.select(le.c.partition).where(still)).scalars())
        lost = [p for p, _ in pairs if p not in kept]
        for p in lost:
            del self.held[p]
        if lost:
            log.warning("lost partitions %s to another relay (our leases had expired)", _ranges(lost))

    def fence(self, conn: Connection, partitions: set[int]) -> set[int]:
        """In the caller's transaction: renew and lock the leases of ``partitions``; return those lost.

        Two statements whatever the partition count: renew (which locks the lease rows this relay
        still owns until the caller commits), then read back owners and generations. The caller
        must not mark rows of a lost partition: another relay owns them now.
        """
        le = self.tables.leases
        exp = _now() + dt.timedelta(seconds=self.ttl)
        parts = sorted(partitions)
        renew = le.update().where(self._mine(le), le.c.partition.in_(parts), le.c.owner == self.relay_id
                                  ).values(expires_at=exp)
        if conn.dialect.update_returning:  # one round trip: the rows we still own come back
            current = {p: (self.relay_id, gen) for p, gen in conn.execute(
                renew.returning(le.c.partition, le.c.generation))}
        else:
            conn.execute(renew)
            current = {
                p: (owner, gen)
                for p, owner, gen in conn.execute(
                    sa.select(le.c.partition, le.c.owner, le.c.generation).where(self._mine(le),
                                                                                 le.c.partition.in_(parts))
                )
            }
        lost: set[int] = set()
        for p in parts:
            if current.get(p) != (self.relay_id, self.held.get(p)):
                lost.add(p)
                self.held.pop(p, None)
        return lost

    def lock_for_claim(self, conn: Connection) -> list[int]:
        """In the caller's (claim) transaction: lock the lease rows this relay still holds; return those partitions.

        The claim, the publish and the mark of a batch run in one transaction, so these lease row
        locks last until the batch is done. A takeover has to lock the lease row too (the
        ``FOR UPDATE SKIP LOCKED`` in :meth:`rebalance`), so no relay can take a partition over
        while its owner is in the middle of a batch of it, for as long as the owner is frozen (GC
        pause, SIGSTOP, VM pause) up to the session's idle-in-transaction bound
        (``RelayConfig.idle_transaction_timeout``), after which the database ends the frozen
        transaction and the locks go. And a relay that wakes up after losing a lease finds
        another owner (or generation) here and claims nothing of that partition. Together: rows
        of a partition are only ever claimed, published and marked by its one current owner.

        A lease row locked by another transaction (a takeover in progress) is skipped: that
        partition is not claimed in this round. Leases found owned by someone else are dropped
        from :attr:`held`.
        """
        if not self.held:
            return []
        le = self.tables.leases
        parts = sorted(self.held)
        key = tuple(parts)
        if self._lock_stmt is None or self._lock_stmt[0] != key:  # built once per set of partitions
            q = sa.select(le.c.partition, le.c.generation).where(
                self._mine(le), le.c.partition.in_(parts), le.c.owner == self.relay_id)
            self._lock_stmt = (key, self.dialect.prepared_select(self.dialect.lock_rows(q)))
        mine = {p: gen for p, gen in self._lock_stmt[1](conn)}
        ok = [p for p in parts if mine.get(p) == self.held[p]]
        lost = [p for p in parts if p in mine and mine[p] != self.held[p]]
        if len(mine) < len(parts):  # not ours any more, or locked by a takeover: find out which
            missing = [p for p in parts if p not in mine]
            owners = dict(conn.execute(
                sa.select(le.c.partition, le.c.generation).where(self._mine(le), le.c.partition.in_(missing))
                .where(sa.or_(le.c.owner.is_(None), le.c.owner != self.relay_id))
            ).all())
            lost.extend(p for p in missing if p in owners)
        if lost:
            for p in lost:
                self.held.pop(p, None)
            log.warning("lost partitions %s to another relay before claiming (our leases had expired)",
                        _ranges(lost))
        return ok

    def release_all(self) -> None:
        le = self.tables.leases
        if not self.held:
            return
        with self.engine.begin() as conn:
            for p, gen in self.held.items():
                conn.execute(
                    le.update()
                    .where(self._mine(le), le.c.partition == p, le.c.owner == self.relay_id,
                           le.c.generation == gen)
                    .values(owner=None, expires_at=None)
                )
        log.info("released %d partitions", len(self.held))
        self.held.clear()

    def _mine(self, le: sa.Table) -> sa.ColumnElement[bool]:
        """This relay's group's lease rows (each group leases every partition on its own)."""
        return le.c.relay_group == self.group

    def require(self, partition: int) -> int:
        try:
            return self.held[partition]
        except KeyError:
            raise LeaseLost(f"partition {partition} is not held by {self.relay_id}") from None


def _ranges(parts: list[int]) -> str:
    parts = sorted(parts)
    out: list[str] = []
    start = prev = None
    for p in parts:
        if start is None:
            start = prev = p
        elif p == prev + 1:  # type: ignore[operator]
            prev = p
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = p
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(out) or "-"
