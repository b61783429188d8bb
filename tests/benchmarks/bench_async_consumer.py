"""Scenario: the asyncio dedup consumer (``AsyncDedupConsumer.process_batch``) against the same asyncio
loop without dedup, and against the sync consumer, on the database alone (no broker).

``--n`` messages per run, in batches of ``--consumer-batch``; ``--dup-share`` of them repeat an
earlier message of the run. Every side inserts one row per message it processes through the same
ORM effect (``session.add``) and commits once per batch:

- ``async_plain``: ``async with AsyncSession(...) as s, s.begin(): await handle(s, m)`` per message;
- ``async_dedup``: ``await consumer.process_batch(async_engine, batch)``;
- ``sync_plain`` / ``sync_dedup``: the same with a sync Session and :class:`DedupConsumer`.

The sides take turns batch by batch, the order rotating each batch, and each side's rate is its
batch size over the median time of its batches: a burst of load from other processes then hits
every side alike, which a run of a second or two a side on a shared 2-core machine cannot promise
(run by run, one such burst swung a side by 2x). ``--rounds`` (default 3) such runs, each on fresh
ids; medians are printed. ``--run-by-run``: each side runs its whole ``--n`` in turn instead.
``--only sync_dedup`` runs one side (to compare two versions of the code in one shell loop).

``--warmup`` batches (default 300) run on every side first, untimed, on ids of their own: the
figures are a running consumer's, not its first minute's. psycopg prepares a statement once it has
run five times (``prepare_threshold``). The plain side's business INSERT has ``--consumer-batch``
rows every batch, so it is prepared after five batches. The dedup side's has that many minus the
batch's duplicates, a row count that varies from batch to batch (30 to 40 counts at 10 %
duplicates). Each count is prepared after its own fifth batch, and all of them only after a few
hundred batches, which a consumer passes in its first seconds. Without the warm-up, a run of 40
batches compares a prepared statement with one parsed and planned each time (6.6 ms against
8.8 ms for 450 rows). ``--warmup 0`` shows that.

``--cpu`` (PostgreSQL on this machine): also the CPU each side costs a message, this process's
(``time.process_time``) plus the server backends' its engines opened (``/proc/<pid>/stat``), and
the ratios of those: on a shared machine the wall clock of a side moves with everyone else's load,
its CPU much less (waits, e.g. the commit's WAL flush, are not in it).

Targets: async_dedup >= 0.9 x async_plain.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import sqlalchemy as sa
from bench_consumer import Base, handler
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from consumers import DedupConsumer, IncomingMessage
from outbox.ids import uuid7

_T = TypeVar("_T")
SIDES = ("async_plain", "async_dedup", "sync_plain", "sync_dedup")
ASYNC_DRIVERS = {"postgresql": "postgresql+psycopg", "mariadb": "mysql+asyncmy"}


def effect(session: Session | AsyncSession, message: IncomingMessage) -> None:
    """The business effect of every side: one row per message (the consumer scenario's)."""
    handler(session, message.id, message.key, message.payload)  # type: ignore[arg-type]


class SyncSink(DedupConsumer):
    name = "bench.sync-sink"

    def handle(self, session, message):
        effect(session, message)


def message_specs(n: int, dup_share: float, keys: int, id_kind: str = "v4") -> list[tuple[str, str, bytes]]:
    """``n`` messages as ``(id, key, payload)``, ``dup_share`` of them repeating an earlier id.
    ``id_kind`` ``v7``: time-ordered ids, what ``Outbox.add`` gives every message the relay sends;
    ``v4``: random ids (a foreign producer)."""
    rnd = random.Random(n)
    make = (lambda: str(uuid7())) if id_kind == "v7" else (lambda: str(uuid.uuid4()))
    ids: list[str] = []
    out = []
    for i in range(n):
        mid = rnd.choice(ids) if ids and rnd.random() < dup_share else make()
        ids.append(mid)
        out.append((mid, b.key_of(i, keys), b.payload_bytes(i)))
    return out


def build(specs: list[tuple[str, str, bytes]]) -> list[IncomingMessage]:
    """The messages of ``specs``. Built batch by batch, just before the batch runs (untimed): a
    consumer holds one batch, and the whole run's messages held at once (80,000 objects) made every
    full garbage collection scan them, in whichever side's batch it fell."""
    return [IncomingMessage(id=mid, topic="bench", key=key, payload=payload, content_type="application/octet-stream")
            for mid, key, payload in specs]


def messages(n: int, dup_share: float, keys: int, id_kind: str = "v4") -> list[IncomingMessage]:
    """:func:`message_specs` as messages."""
    return build(message_specs(n, dup_share, keys, id_kind))


def batches(msgs: list[_T], size: int) -> list[list[_T]]:
    return [msgs[i:i + size] for i in range(0, len(msgs), size)]


async def async_plain(aengine: AsyncEngine, work: list[list[IncomingMessage]]) -> None:
    async def handle(session: AsyncSession, message: IncomingMessage) -> None:
        effect(session, message)

    for batch in work:
        async with AsyncSession(aengine, expire_on_commit=False) as s, s.begin():
            for m in batch:
                await handle(s, m)


def sync_plain(engine: sa.Engine, work: list[list[IncomingMessage]]) -> None:
    for batch in work:
        with Session(engine, expire_on_commit=False) as s, s.begin():
            for m in batch:
                effect(s, m)


class BackendCPU:
    """CPU seconds of the PostgreSQL backends the watched engines connected to (this machine's server)."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.tick = os.sysconf("SC_CLK_TCK")

    def watch(self, engine: sa.Engine) -> None:
        def on_connect(dbapi_connection: object, _record: object) -> None:
            cur = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cur.execute("SELECT pg_backend_pid()")
            self.pids.append(int(cur.fetchone()[0]))
            cur.close()

        sa.event.listen(engine, "connect", on_connect)

    def seconds(self) -> float:
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the backend ended (a connection the pool dropped)
                continue
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        return total / self.tick


def main() -> None:
    p = b.parser(__doc__ or "", n=20_000, keys=1000)
    p.add_argument("--consumer-batch", type=int, default=500, help="messages per DB transaction (every side)")
    p.add_argument("--dup-share", type=float, default=0.10)
    p.add_argument("--ids", choices=["v4", "v7"], default="v4",
                   help="message ids: v4 random (a foreign producer's), v7 time-ordered (what Outbox.add makes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=SIDES, help="run one side only")
    p.add_argument("--run-by-run", action="store_true",
                   help="each side runs all its batches in turn (default: the sides take turns batch by batch, "
                        "rates from the median batch time)")
    p.add_argument("--interleave", action="store_true", help="the default (kept for older commands)")
    p.add_argument("--warmup", type=int, default=None,
                   help="batches each side runs first, untimed (default 300, --quick 30; see above)")
    p.add_argument("--no-prepare", action="store_true",
                   help="PostgreSQL: psycopg's server-side prepared statements off on every side (prepare_threshold "
                        "None): the plain side's business INSERT always has --consumer-batch rows, so psycopg prepares "
                        "it after five batches; the dedup side's has that many minus the batch's duplicates, a "
                        "different statement almost every batch, parsed and planned each time")
    p.add_argument("--cpu", action="store_true",
                   help="also report the CPU a message costs each side (this process + its server backends)")
    args = b.parse(p)
    sides = (args.only,) if args.only else SIDES
    rates: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [0.0, 0] for s in sides}  # seconds, messages
    if args.cpu and args.db != "postgresql":
        p.error("--cpu reads the PostgreSQL backends' CPU")
    if args.no_prepare and args.db != "postgresql":
        p.error("--no-prepare is psycopg's (PostgreSQL)")
    connect_args = {"prepare_threshold": None} if args.no_prepare else {}
    with b.bench_database(args.db) as created:
        Base.metadata.create_all(created)
        engine = sa.create_engine(created.url, pool_size=10, connect_args=connect_args) if connect_args else created
        aengine = create_async_engine(engine.url.set(drivername=ASYNC_DRIVERS[args.db]), pool_size=10,
                                      connect_args=connect_args)
        backends = BackendCPU()
        if args.cpu:
            backends.watch(engine)
            backends.watch(aengine.sync_engine)
        loop = asyncio.new_event_loop()
        sync_sink, async_sink = SyncSink(), (async_sink_class()() if "async_dedup" in sides else None)
        runs: dict[str, Callable[[list[list[IncomingMessage]]], object]] = {
            "async_plain": lambda w: loop.run_until_complete(async_plain(aengine, w)),
            "async_dedup": lambda w: loop.run_until_complete(_all(async_sink, aengine, w)),
            "sync_plain": lambda w: sync_plain(engine, w),
            "sync_dedup": lambda w: [sync_sink.process_batch(engine, batch) for batch in w],
        }
        warmup = args.warmup if args.warmup is not None else (30 if args.quick else 300)
        for side in sides:
            if warmup:
                b.note(f"warm-up {side}: {warmup} batches")
                for chunk in batches(message_specs(warmup * args.consumer_batch, args.dup_share, args.keys,
                                                   args.ids), args.consumer_batch):
                    runs[side]([build(chunk)])
        with b.frozen_heap():  # as `outbox consume` runs its loop, on every side alike
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                if not args.run_by_run:
                    specs_of = {s: batches(message_specs(args.n, args.dup_share, args.keys, args.ids),
                                           args.consumer_batch) for s in sides}
                    times: dict[str, list[float]] = {s: [] for s in sides}
                    for j in range(len(specs_of[sides[0]])):
                        for side in order[j % len(order):] + order[:j % len(order)]:
                            batch = build(specs_of[side][j])
                            c0 = (backends.seconds() + time.process_time()) if args.cpu else 0.0
                            t0 = time.perf_counter()
                            runs[side]([batch])
                            times[side].append((time.perf_counter() - t0) / len(batch))
                            if args.cpu:
                                cpu[side][0] += time.process_time() + backends.seconds() - c0
                                cpu[side][1] += len(batch)
                    for side in order:
                        rates[side].append(1 / statistics.median(times[side]))
                        b.note(f"round {r + 1} {side}: {rates[side][-1]:.0f} msg/s (median batch)")
                    continue
                for side in order:
                    work = batches(messages(args.n, args.dup_share, args.keys, args.ids), args.consumer_batch)
                    c0 = (backends.seconds() + time.process_time()) if args.cpu else 0.0
                    t0 = time.perf_counter()
                    runs[side](work)
                    rates[side].append(args.n / (time.perf_counter() - t0))
                    if args.cpu:
                        cpu[side][0] += time.process_time() + backends.seconds() - c0
                        cpu[side][1] += args.n
                    b.note(f"round {r + 1} {side}: {rates[side][-1]:.0f} msg/s")
        loop.run_until_complete(aengine.dispose())
        loop.close()
        if engine is not created:
            engine.dispose()
    med = {s: statistics.median(v) for s, v in rates.items()}
    b.emit("async_consumer_db", args.db)
    b.emit("async_consumer_messages", args.n)
    b.emit("async_consumer_ids", args.ids)
    b.emit("async_consumer_batch", args.consumer_batch)
    b.emit("async_consumer_warmup_batches", warmup)
    b.emit("async_consumer_timing", "run by run" if args.run_by_run else "interleaved, median batch")
    b.emit("async_consumer_prepared_statements", "off" if args.no_prepare else "psycopg default (after 5 runs)")
    for side in sides:
        b.emit(f"{side}_msgs_per_s", med[side])
    per_msg = {s: cpu[s][0] / cpu[s][1] * 1e6 for s in sides if cpu[s][1]}
    for side, us in per_msg.items():
        b.emit(f"{side}_cpu_us_per_msg", us)
    if args.only:
        return
    b.emit("async_dedup_vs_async_plain_ratio", b.ratio(med["async_dedup"], med["async_plain"]))
    b.emit("async_dedup_vs_sync_dedup_ratio", b.ratio(med["async_dedup"], med["sync_dedup"]))
    b.emit("sync_dedup_vs_sync_plain_ratio", b.ratio(med["sync_dedup"], med["sync_plain"]))
    if per_msg:  # rates by CPU: the plain side's CPU a message over the dedup side's
        b.emit("async_dedup_vs_async_plain_cpu_ratio", b.ratio(per_msg["async_plain"], per_msg["async_dedup"]))
        b.emit("sync_dedup_vs_sync_plain_cpu_ratio", b.ratio(per_msg["sync_plain"], per_msg["sync_dedup"]))


def async_sink_class() -> type:
    """Defined on use, so that ``--only sync_*`` also runs against code without the asyncio consumer."""
    from consumers import AsyncDedupConsumer

    class AsyncSink(AsyncDedupConsumer):
        name = "bench.async-sink"

        async def handle(self, session, message):
            effect(session, message)

    return AsyncSink


async def _all(consumer: object, aengine: AsyncEngine, work: list[list[IncomingMessage]]) -> None:
    for batch in work:
        await consumer.process_batch(aengine, batch)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
