"""The asyncio dedup consumer (AsyncKafkaRunner + AsyncDedupConsumer) against the same
asyncio consumer loop without dedup, with the sync consumer's figures (scenario 5) in the same run.

``--n`` messages are produced once to Kafka with a ``message-id`` header; 10 % of them repeat an
earlier message. Each of the four consumers then reads the whole topic as a new group:

- ``async_dedup``: ``AsyncKafkaRunner`` + ``AsyncDedupConsumer`` on an ``AsyncEngine``;
- ``async_plain``: the same asyncio client (confluent-kafka's ``AIOConsumer``), the same batch size,
  the same ORM handler on an ``AsyncSession`` of the same ``AsyncEngine``, DB commit per batch and
  then a synchronous offset commit, and no dedup (the baseline of the 0.9 x target);
- ``sync_dedup`` / ``sync_plain``: bench_consumer.py's ``KafkaRunner`` + ``DedupConsumer`` and its
  plain confluent-kafka loop, for the async/sync ratio.

Each is timed from its first batch received to its last offset commit (the group join is not
counted). First ``--warmup`` messages (on a topic of their own, with the same share of duplicates) go through each
of the four once, untimed, as in bench_consumer.py: psycopg prepares a statement after its fifth
execution, and the dedup side's business INSERT comes in about 32 row counts (500 minus each batch's
duplicates) against the plain side's one, so a cold run times the dedup side's preparation.
``--rounds`` rounds (default 3), the order of the four reversed every other round; the
figures are the medians. Each dedup run has a consumer name of its own, so every run sees the same
10 % duplicates; the processed table is seeded with ``--history`` earlier ids and analysed first
(as in bench_consumer.py). Dead tuples of the processed and business tables are read around the
first async dedup run (autovacuum off on both). ``--drivers psycopg,asyncpg`` times each async
PostgreSQL driver (the first one is the headline).

Target: async dedup >= 0.9 x the async loop without dedup; no dead tuples from duplicates.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import bench_consumer as sync_bench
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from consumers import AsyncDedupConsumer, AsyncKafkaRunner
from outbox.schema import default_tables

ASYNC_SCHEMES = {"psycopg": "postgresql+psycopg", "asyncpg": "postgresql+asyncpg", "asyncmy": "mysql+asyncmy"}


class AsyncSink(AsyncDedupConsumer):
    name = "bench.async-sink"

    async def handle(self, session, message):
        sync_bench.handler(session, message.id, message.key, message.payload)


class TimedAsyncRunner(AsyncKafkaRunner):
    """Stops once ``target`` messages are settled; times first batch -> last offset commit."""

    target = 0
    t_first = 0.0
    t_last = 0.0
    settled = 0

    async def process(self, batch):
        if not self.t_first:
            self.t_first = time.perf_counter()
        return await super().process(batch)

    async def _commit(self, kc, outcomes):
        await super()._commit(kc, outcomes)
        self.settled += sum(1 for o in outcomes if o.done)
        if self.settled >= self.target:
            self.t_last = time.perf_counter()
            self.stop()


def async_engine(engine: sa.Engine, driver: str) -> AsyncEngine:
    url = engine.url.set(drivername=ASYNC_SCHEMES[driver])
    return create_async_engine(url, pool_size=10, max_overflow=10)


async def async_dedup(engine: sa.Engine, driver: str, bootstrap: str, topic: str, n: int, batch: int, conf: dict,
                      name: str, dups: int) -> float:
    aengine = async_engine(engine, driver)
    try:
        runner = TimedAsyncRunner(AsyncSink(name=name), engine=aengine, bootstrap_servers=bootstrap, topics=[topic],
                                  group_id=f"bench-adedup-{uuid.uuid4().hex[:6]}", config=conf, batch_size=batch,
                                  requeue_interval=None)
        runner.target = n
        await runner.run()
        s = runner.stats
        if s.processed != n - dups or s.duplicates != dups:
            raise SystemExit(f"async dedup consumer: {s}, expected {n - dups} processed, {dups} duplicates")
        return runner.t_last - runner.t_first
    finally:
        await aengine.dispose()


async def async_plain(engine: sa.Engine, driver: str, bootstrap: str, topic: str, n: int, batch: int,
                      conf: dict) -> float:
    """The baseline: the runner's client and engine, the same handler, DB commit then offset commit, no dedup."""
    from confluent_kafka.aio import AIOConsumer

    aengine = async_engine(engine, driver)
    kc = AIOConsumer({**conf, "bootstrap.servers": bootstrap, "group.id": f"bench-aplain-{uuid.uuid4().hex[:6]}",
                      "enable.auto.commit": False, "enable.auto.offset.store": False}, max_workers=2)
    try:
        await kc.subscribe([topic])
        seen = 0
        t_first = 0.0
        while seen < n:
            msgs = [m for m in await kc.consume(num_messages=batch, timeout=0.5) if m.error() is None]
            if not msgs:
                continue
            if not t_first:
                t_first = time.perf_counter()
            async with AsyncSession(aengine, expire_on_commit=False) as s, s.begin():
                for m in msgs:
                    sync_bench.handler(s, *sync_bench.record_fields(m))  # type: ignore[arg-type]
            await kc.commit(offsets=sync_bench.next_offsets(msgs), asynchronous=False)
            seen += len(msgs)
        return time.perf_counter() - t_first
    finally:
        await kc.close()
        await aengine.dispose()


def sync_dedup(engine: sa.Engine, bootstrap: str, topic: str, n: int, batch: int, conf: dict, name: str,
               dups: int) -> float:
    runner = sync_bench.TimedRunner(sync_bench.Sink(name=name), engine=engine, bootstrap_servers=bootstrap,
                                    topics=[topic], group_id=f"bench-dedup-{uuid.uuid4().hex[:6]}", config=conf,
                                    batch_size=batch, requeue_interval=None)
    runner.target = n
    runner.run()
    s = runner.stats
    if s.processed != n - dups or s.duplicates != dups:
        raise SystemExit(f"sync dedup consumer: {s}, expected {n - dups} processed, {dups} duplicates")
    return runner.t_last - runner.t_first


def main() -> None:
    p = b.parser(__doc__ or "", n=50_000, keys=1000, warmup=50_000)
    p.add_argument("--consumer-batch", type=int, default=500, help="messages per DB transaction (every consumer)")
    p.add_argument("--dup-share", type=float, default=0.10)
    p.add_argument("--history", type=int, default=200_000,
                   help="earlier processed ids in the table before the run (PostgreSQL; then ANALYZE)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the four consumers; medians are reported")
    p.add_argument("--drivers", default=None,
                   help="comma-separated async drivers (psycopg, asyncpg; asyncmy on MariaDB); the first is the "
                        "headline (default: psycopg, or asyncmy with --db mariadb)")
    p.add_argument("--profile", metavar="PATH", help="sample the first async dedup run with py-spy into PATH")
    args = b.parse(p)
    drivers = (args.drivers or ("asyncmy" if args.db == "mariadb" else "psycopg")).split(",")
    unknown = [d for d in drivers if d not in ASYNC_SCHEMES]
    if unknown:
        p.error(f"unknown driver(s) {', '.join(unknown)}; choose from {', '.join(ASYNC_SCHEMES)}")
    pg = args.db == "postgresql"
    if not pg:
        b.note("dead-tuple counts are PostgreSQL-only; throughput is still measured")
    conf = {"session.timeout.ms": 6000, "auto.offset.reset": "earliest"}
    times: dict[str, list[float]] = {}
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        sync_bench.Base.metadata.create_all(engine)
        if pg:
            sync_bench.seed_history(engine, AsyncSink.name, args.history)
            with engine.begin() as conn:
                for t in (default_tables().processed.name, sync_bench.Event.__tablename__):
                    conn.execute(sa.text(f'ALTER TABLE "{t}" SET (autovacuum_enabled = false)'))
        topic = b.create_topic(bootstrap)
        t0 = time.perf_counter()
        dups = sync_bench.produce(bootstrap, topic, args.n, args.keys, args.dup_share)
        b.note(f"produced {args.n} ({dups} duplicates) in {time.perf_counter() - t0:.1f} s")
        common = (bootstrap, topic, args.n, args.consumer_batch, conf)

        runs: list[tuple[str, Callable[[str], float]]] = []
        for d in drivers:
            runs.append((f"async_dedup_{d}",
                         lambda name, d=d: asyncio.run(async_dedup(engine, d, *common, name, dups))))
            runs.append((f"async_plain_{d}", lambda name, d=d: asyncio.run(async_plain(engine, d, *common))))
        runs.append(("sync_dedup", lambda name: sync_dedup(engine, *common, name, dups)))
        runs.append(("sync_plain", lambda name: sync_bench.baseline(engine, *common)))

        if args.warmup:
            warm_topic = b.create_topic(bootstrap)
            t0 = time.perf_counter()
            warm_dups = sync_bench.produce(bootstrap, warm_topic, args.warmup, args.keys, args.dup_share)
            warm_common = (bootstrap, warm_topic, args.warmup, args.consumer_batch, conf)
            for d in drivers:
                asyncio.run(async_dedup(engine, d, *warm_common, f"bench.warmup-async-{d}", warm_dups))
                asyncio.run(async_plain(engine, d, *warm_common))
            sync_dedup(engine, *warm_common, "bench.warmup-sync", warm_dups)
            sync_bench.baseline(engine, *warm_common)
            b.note(f"warm-up: {args.warmup} messages through each consumer in {time.perf_counter() - t0:.1f} s")

        tuples: dict[str, Any] = {}
        for r in range(args.rounds):
            for label, run in runs if r % 2 == 0 else runs[::-1]:
                first_async = r == 0 and label == runs[0][0]
                if first_async and pg:
                    sync_bench.flush_stats(engine)
                    tuples["before"] = sync_bench.dead_tuples(engine)
                b.note(f"round {r + 1}: {label}")
                with b.frozen_heap(), b.profiled(args.profile if first_async else None):
                    times.setdefault(label, []).append(run(f"bench.{label}-{r}"))
                if first_async and pg:
                    sync_bench.flush_stats(engine)
                    tuples["after"] = sync_bench.dead_tuples(engine)

    rate = {label: args.n / statistics.median(ts) for label, ts in times.items()}
    b.emit("consumer_async_db", args.db)
    b.emit("consumer_async_messages", args.n)
    b.emit("consumer_async_duplicates", dups)
    b.emit("consumer_async_batch", args.consumer_batch)
    b.emit("consumer_async_rounds", args.rounds)
    b.emit("consumer_async_warmup_messages", args.warmup)
    for label, ts in times.items():
        b.emit(f"consumer_{label}_msgs_per_s", rate[label])
        b.emit(f"consumer_{label}_runs_msgs_per_s", " ".join(f"{args.n / t:.0f}" for t in ts))
    for d in drivers:
        b.emit(f"consumer_async_dedup_vs_async_plain_ratio_{d}", b.ratio(rate[f"async_dedup_{d}"],
                                                                         rate[f"async_plain_{d}"]))
        b.emit(f"consumer_async_dedup_vs_sync_dedup_ratio_{d}", b.ratio(rate[f"async_dedup_{d}"], rate["sync_dedup"]))
        b.emit(f"consumer_async_plain_vs_sync_plain_ratio_{d}", b.ratio(rate[f"async_plain_{d}"], rate["sync_plain"]))
    b.emit("consumer_sync_dedup_vs_sync_plain_ratio", b.ratio(rate["sync_dedup"], rate["sync_plain"]))
    if pg:
        for label in ("processed", "events"):
            b.emit(f"consumer_async_{label}_table_n_dead_tup_before", tuples["before"][label])
            b.emit(f"consumer_async_{label}_table_n_dead_tup_after", tuples["after"][label])


if __name__ == "__main__":
    main()
