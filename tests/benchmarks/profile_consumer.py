"""Deterministic profile of the dedup consumer against the plain loop (bench_consumer's scenario).

    python tests/benchmarks/profile_consumer.py [--n 20000] [--top 25]

Wall clock is noisy on a shared machine; these measures are not: per message, the Python
function calls (cProfile) and the SQL statements sent (cursor executes, an executemany counted
once, as one round trip; with the time from send to result per statement kind), for the
KafkaRunner + DedupConsumer run and for the plain confluent-kafka loop over the same records
(same handler, same batch size, same DB commit and offset commit per batch).
Prints ``name: value`` lines, then both cProfile tops.
"""

from __future__ import annotations

import collections
import cProfile
import io
import pstats
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import bench_consumer as bc
import sqlalchemy as sa

from outbox.schema import default_tables


class Statements:
    """Per statement kind (its first three words): how many were sent, and the seconds from send to result."""

    def __init__(self, engine: sa.Engine) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.seconds: collections.Counter[str] = collections.Counter()
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        conn.info["_prof_t0"] = time.perf_counter()

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        kind = " ".join(statement.split()[:3])
        self.counts[kind] += 1
        self.seconds[kind] += time.perf_counter() - conn.info.pop("_prof_t0", time.perf_counter())

    def take(self) -> dict[str, tuple[int, float]]:
        out = {k: (n, self.seconds[k]) for k, n in self.counts.items()}
        self.counts.clear()
        self.seconds.clear()
        return out


def top(prof: cProfile.Profile, n: int, key: str) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(key).print_stats(n)
    return out.getvalue()


def main() -> None:
    p = b.parser(__doc__ or "", n=20_000, keys=1000)
    p.add_argument("--consumer-batch", type=int, default=500)
    p.add_argument("--dup-share", type=float, default=0.10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--save", metavar="PREFIX", help="also write PREFIX.dedup.prof and PREFIX.plain.prof (pstats)")
    args = b.parse(p)
    conf = {"session.timeout.ms": 6000, "auto.offset.reset": "earliest"}
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        bc.Base.metadata.create_all(engine)
        topic = b.create_topic(bootstrap)
        dups = bc.produce(bootstrap, topic, args.n, args.keys, args.dup_share)
        counts = Statements(engine)

        runner = bc.TimedRunner(bc.Sink(), engine=engine, bootstrap_servers=bootstrap, topics=[topic],
                                group_id=f"prof-dedup-{uuid.uuid4().hex[:6]}", config=conf,
                                batch_size=args.consumer_batch, requeue_interval=None)
        runner.target = args.n
        prof_d = cProfile.Profile()
        prof_d.enable()
        runner.run()
        prof_d.disable()
        dedup_counts = counts.take()
        if runner.stats.processed != args.n - dups:
            raise SystemExit(f"dedup consumer: {runner.stats}")

        prof_p = cProfile.Profile()
        prof_p.enable()
        bc.baseline(engine, bootstrap, topic, args.n, args.consumer_batch, conf)
        prof_p.disable()
        plain_counts = counts.take()
        with engine.connect() as conn:
            processed = conn.execute(sa.select(sa.func.count()).select_from(default_tables().processed)).scalar_one()

    def calls(prof: cProfile.Profile) -> int:
        return sum(v[1] for v in pstats.Stats(prof).stats.values())  # type: ignore[attr-defined]

    batches = -(-args.n // args.consumer_batch)
    b.emit("profile_messages", args.n)
    b.emit("profile_duplicates", dups)
    b.emit("profile_dedup_rows", processed)
    b.emit("profile_dedup_calls_per_msg", calls(prof_d) / args.n)
    b.emit("profile_plain_calls_per_msg", calls(prof_p) / args.n)
    b.emit("profile_calls_ratio", b.ratio(calls(prof_d), calls(prof_p)))
    for label, c in (("dedup", dedup_counts), ("plain", plain_counts)):
        b.emit(f"profile_{label}_statements", sum(n for n, _ in c.values()))
        b.emit(f"profile_{label}_statement_ms_per_batch", 1000 * sum(t for _, t in c.values()) / batches)
        for stmt, (k, t) in sorted(c.items(), key=lambda kv: -kv[1][0]):
            b.note(f"{label}: {k:6d} statements, {1000 * t / k:7.2f} ms each  {stmt}")
    if args.save:
        prof_d.dump_stats(f"{args.save}.dedup.prof")
        prof_p.dump_stats(f"{args.save}.plain.prof")
    print(top(prof_d, args.top, "tottime"), file=sys.stderr)
    print(top(prof_p, args.top, "tottime"), file=sys.stderr)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    b.note(f"took {time.perf_counter() - t0:.1f} s")
