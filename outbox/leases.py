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
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .dialects import Dialect
from .errors import LeaseLost, SingleRelayOnly
from .schema import OutboxTables

__all__ = ["LeaseManager", "default_relay_id"]

log = logging.getLogger("outbox.relay")


def default_relay_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class LeaseManager:
    engine: Engine
    tables: OutboxTables
    dialect: Dialect
    relay_id: str
    ttl: float
    min_partitions: int
    held: dict[int, int] = field(default_factory=dict)
    """partition -> generation this relay holds it under."""
    partition_count: int = 0
    acquired_at: dict[int, float] = field(default_factory=dict)
    """partition -> monotonic time this relay took it over from a relay whose lease lapsed (for logs
    and tests; ordering no longer depends on it: see :meth:`lock_for_claim`)."""

    # ---------------------------------------------------------------- membership
    def register(self) -> None:
        """Announce this relay (or refresh its row) and drop relays that are long gone."""
        r = self.tables.relays
        now = _now()
        exp = now + dt.timedelta(seconds=self.ttl)
        with self.engine.begin() as conn:
            if not self.dialect.supports_concurrent_relays:
                other = conn.execute(
                    sa.select(r.c.relay_id, r.c.hostname, r.c.pid)
                    .where(r.c.relay_id != self.relay_id, r.c.expires_at > now)
                ).first()
                if other is not None:
                    raise SingleRelayOnly(
                        f"another relay ({other.relay_id}, pid {other.pid} on {other.hostname}) is running on this "
                        f"{self.dialect.name} database, which supports a single relay; stop it first, or wait "
                        f"{self.ttl:.0f} s if it died"
                    )
            # long-expired members are removed so `outbox status` stays readable
            conn.execute(r.delete().where(r.c.expires_at < now - dt.timedelta(seconds=self.ttl * 4)))
            updated = conn.execute(
                r.update().where(r.c.relay_id == self.relay_id).values(heartbeat_at=now, expires_at=exp)
            ).rowcount
            if not updated:
                conn.execute(r.insert().values(
                    relay_id=self.relay_id, hostname=socket.gethostname(), pid=os.getpid(),
                    started_at=now, heartbeat_at=now, expires_at=exp,
                ))

    def unregister(self) -> None:
        r = self.tables.relays
        with self.engine.begin() as conn:
            conn.execute(r.delete().where(r.c.relay_id == self.relay_id))

    # ---------------------------------------------------------------- partitions
    def ensure_partitions(self) -> int:
        """Make sure a lease row exists for every partition writers use; return the count."""
        o, le = self.tables.outbox, self.tables.leases
        with self.engine.begin() as conn:
            highest = conn.execute(sa.select(sa.func.max(o.c.partition))).scalar()
            have = conn.execute(sa.select(sa.func.count()).select_from(le)).scalar_one()
            wanted = max(self.min_partitions, (highest + 1) if highest is not None else 0, have)
            if have < wanted:
                existing = set(conn.execute(sa.select(le.c.partition)).scalars())
                missing = [{"partition": p, "generation": 0} for p in range(wanted) if p not in existing]
                if missing:
                    conn.execute(self.dialect.insert_ignore(le), missing)
        self.partition_count = wanted
        return wanted

    def rebalance(self) -> None:
        """Renew held leases, give back partitions over the fair share, take free ones up to it."""
        now = _now()
        exp = now + dt.timedelta(seconds=self.ttl)
        le, r = self.tables.leases, self.tables.relays
        with self.engine.begin() as conn:
            live = sorted(conn.execute(sa.select(r.c.relay_id).where(r.c.expires_at > now)).scalars())
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
                        .where(le.c.partition == p, le.c.owner == self.relay_id, le.c.generation == self.held[p])
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
                    .where(le.c.partition < total)
                    .order_by(le.c.partition)
                    .limit(want + len(self.held))
                )
                gained = []
                for p, gen, previous in conn.execute(self.dialect.lock_rows(q)).all():
                    if p in self.held or len(gained) >= want:
                        continue
                    took = conn.execute(
                        le.update()
                        .where(le.c.partition == p, le.c.generation == gen)
                        .where(sa.or_(le.c.owner.is_(None), le.c.expires_at < now, le.c.owner == self.relay_id))
                        .values(owner=self.relay_id, generation=gen + 1, expires_at=exp)
                    ).rowcount
                    if took:
                        self.held[p] = gen + 1
                        if previous not in (None, self.relay_id):  # taken over from a lapsed relay
                            self.acquired_at[p] = time.monotonic()
                        gained.append(p)
                if gained:
                    log.info("took partitions %s (now %d of %d, %d relays)", _ranges(gained), len(self.held),
                             total, len(live))

    def _renew(self, conn: Connection, exp: dt.datetime) -> None:
        le = self.tables.leases
        lost = []
        for p, gen in list(self.held.items()):
            n = conn.execute(
                le.update()
                .where(le.c.partition == p, le.c.owner == self.relay_id, le.c.generation == gen)
                .values(expires_at=exp)
            ).rowcount
            if not n:
                lost.append(p)
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
        renew = le.update().where(le.c.partition.in_(parts), le.c.owner == self.relay_id).values(expires_at=exp)
        if conn.dialect.update_returning:  # one round trip: the rows we still own come back
            current = {p: (self.relay_id, gen) for p, gen in conn.execute(
                renew.returning(le.c.partition, le.c.generation))}
        else:
            conn.execute(renew)
            current = {
                p: (owner, gen)
                for p, owner, gen in conn.execute(
                    sa.select(le.c.partition, le.c.owner, le.c.generation).where(le.c.partition.in_(parts))
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
        while its owner is in the middle of a batch of it, however long the owner is frozen
        (GC pause, SIGSTOP, VM pause). And a relay that wakes up after losing a lease finds
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
        q = sa.select(le.c.partition, le.c.generation).where(le.c.partition.in_(parts), le.c.owner == self.relay_id)
        mine = dict(conn.execute(self.dialect.lock_rows(q)).all())
        ok = [p for p in parts if mine.get(p) == self.held[p]]
        lost = [p for p in parts if p in mine and mine[p] != self.held[p]]
        if len(mine) < len(parts):  # not ours any more, or locked by a takeover: find out which
            missing = [p for p in parts if p not in mine]
            owners = dict(conn.execute(
                sa.select(le.c.partition, le.c.generation).where(le.c.partition.in_(missing))
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
                    .where(le.c.partition == p, le.c.owner == self.relay_id, le.c.generation == gen)
                    .values(owner=None, expires_at=None)
                )
        log.info("released %d partitions", len(self.held))
        self.held.clear()

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
