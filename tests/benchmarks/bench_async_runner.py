"""The asyncio Kafka runner (AsyncKafkaRunner + AsyncDedupConsumer) against the threaded one (KafkaRunner +
DedupConsumer) and against a plain asyncio loop (confluent_kafka.aio consumer, AsyncSession inserts, offset
commit per batch) without dedup, in the same run.

``--n`` messages (10 % repeats of earlier ones) are produced once; each round then reads them all
with each of the three consumers, in turn, each in its own group and (for the dedup consumers)
under its own consumer name, so every round sees the same work. Each is timed from its first batch
to its last offset commit. Medians over ``--rounds`` rounds; ratios of the medians.

Reads: ``async_runner_vs_plain_async_ratio`` (the dedup runner against the same asyncio loop
without dedup) and ``async_runner_vs_sync_runner_ratio``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
from bench_consumer import Base, Sink, TimedRunner, handler, produce, seed_history
from confluent_kafka import TopicPartition
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from consumers import AsyncDedupConsumer, AsyncKafkaRunner

CONF = {"session.timeout.ms": 6000, "auto.offset.reset": "earliest"}


class AsyncSink(AsyncDedupConsumer):
    name = "bench.async-sink"

    async def handle(self, session, message):
        handler(session, message.id, message.key, message.payload)  # session.add: the same effect


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


def async_url(engine) -> str:
    url = engine.url
    backend = url.drivername.partition("+")[0]
    if backend == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    elif backend in ("mysql", "mariadb"):
        url = url.set(drivername=f"{backend}+asyncmy")
    return url.render_as_string(hide_password=False)


def run_sync(engine, bootstrap: str, topic: str, n: int, batch: int, tag: str) -> float:
    runner = TimedRunner(Sink(name=f"bench.sink-{tag}"), engine=engine, bootstrap_servers=bootstrap, topics=[topic],
                         group_id=f"bench-sync-{tag}", config=CONF, batch_size=batch, requeue_interval=None)
    runner.target = n
    runner.run()
    return runner.t_last - runner.t_first


async def run_async(aengine, bootstrap: str, topic: str, n: int, batch: int, tag: str) -> float:
    runner = TimedAsyncRunner(AsyncSink(name=f"bench.async-sink-{tag}"), engine=aengine, bootstrap_servers=bootstrap,
                              topics=[topic], group_id=f"bench-async-{tag}", config=CONF, batch_size=batch,
                              requeue_interval=None)
    runner.target = n
    await runner.run()
    return runner.t_last - runner.t_first


async def run_plain_async(aengine, bootstrap: str, topic: str, n: int, batch: int, tag: str) -> float:
    from confluent_kafka.aio import AIOConsumer

    kc = AIOConsumer({**CONF, "bootstrap.servers": bootstrap, "group.id": f"bench-plain-async-{tag}",
                      "enable.auto.commit": False, "enable.auto.offset.store": False}, max_workers=2)
    await kc.subscribe([topic])
    seen, t_first = 0, 0.0
    try:
        while seen < n:
            msgs = [m for m in await kc.consume(batch, 0.5) if m.error() is None]
            if not msgs:
                continue
            if not t_first:
                t_first = time.perf_counter()
            async with AsyncSession(aengine) as s, s.begin():
                for m in msgs:
                    mid = dict(m.headers() or []).get("message-id", b"").decode()
                    key = m.key()
                    handler(s, mid, key.decode() if key is not None else None, bytes(m.value() or b""))
            upto: dict[tuple[str, int], int] = {}
            for m in msgs:
                upto[(m.topic(), m.partition())] = m.offset() + 1
            await kc.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in upto.items()], asynchronous=False)
            seen += len(msgs)
        return time.perf_counter() - t_first
    finally:
        await kc.close()


def main() -> None:
    p = b.parser(__doc__ or "", n=20_000, keys=1000)
    p.add_argument("--consumer-batch", type=int, default=500, help="messages per DB transaction (all three)")
    p.add_argument("--dup-share", type=float, default=0.10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--history", type=int, default=50_000, help="earlier processed ids, then ANALYZE (PostgreSQL)")
    args = b.parse(p)
    times: dict[str, list[float]] = {"sync": [], "async": [], "plain_async": []}
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        Base.metadata.create_all(engine)
        if args.db == "postgresql":  # statistics, as a production table has (see bench_consumer.seed_history)
            seed_history(engine, "bench.history", args.history)
        topic = b.create_topic(bootstrap)
        dups = produce(bootstrap, topic, args.n, args.keys, args.dup_share)
        b.note(f"produced {args.n} ({dups} duplicates)")

        async def async_round(tag: str) -> tuple[float, float]:
            aengine = create_async_engine(async_url(engine))
            try:
                t_async = await run_async(aengine, bootstrap, topic, args.n, args.consumer_batch, tag)
                t_plain = await run_plain_async(aengine, bootstrap, topic, args.n, args.consumer_batch, tag)
                return t_async, t_plain
            finally:
                await aengine.dispose()

        for r in range(args.rounds):
            tag = f"{r}-{uuid.uuid4().hex[:6]}"
            times["sync"].append(run_sync(engine, bootstrap, topic, args.n, args.consumer_batch, tag))
            t_async, t_plain = asyncio.run(async_round(tag))
            times["async"].append(t_async)
            times["plain_async"].append(t_plain)
            b.note(f"round {r + 1}: " + ", ".join(f"{k} {args.n / v[-1]:.0f} msg/s" for k, v in times.items()))
    rate = {k: args.n / statistics.median(v) for k, v in times.items()}
    b.emit("async_runner_db", args.db)
    b.emit("async_runner_messages", args.n)
    b.emit("async_runner_duplicates", dups)
    b.emit("async_runner_rounds", args.rounds)
    b.emit("async_runner_msgs_per_s", rate["async"])
    b.emit("sync_runner_msgs_per_s", rate["sync"])
    b.emit("baseline_plain_async_loop_msgs_per_s", rate["plain_async"])
    b.emit("async_runner_vs_plain_async_ratio", b.ratio(rate["async"], rate["plain_async"]))
    b.emit("async_runner_vs_sync_runner_ratio", b.ratio(rate["async"], rate["sync"]))


if __name__ == "__main__":
    main()
