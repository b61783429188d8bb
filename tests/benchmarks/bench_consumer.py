"""Scenario 5: the dedup consumer (KafkaRunner + DedupConsumer) against a plain confluent-kafka
consumer loop doing the same inserts in batches of the same size without dedup.

``--n`` messages are produced straight to Kafka with a ``message-id`` header; 10 % of them repeat
an earlier message (same id, key and payload). Both consumers insert one row per message they
process into a business table through the same ORM handler, commit the database transaction per
batch and then commit the Kafka offsets synchronously. Each is timed from the first batch
received to the last offset commit (the group join is not counted; ``session.timeout.ms`` 6000).
Dead tuples (``n_dead_tup``) of the processed-messages and business tables are read before and
after, with autovacuum off on both tables. ``--rounds`` (3) passes of each side over the same
records alternate (dedup first in odd rounds, plain first in even ones; each dedup round under a
fresh consumer name with its own seeded history); medians are printed.

Before the timed rounds, ``--warmup`` (150,000) more messages of the same shape, on a topic of their
own, go once through each side untimed, on the same engine. psycopg prepares a statement after its
fifth execution, and the business INSERT's SQL differs with its row count: the plain loop's batches
are nearly all 500 rows (prepared after 5 batches), the dedup side's 500 minus that batch's
duplicates (about 32 different counts, each prepared only after its own fifth batch). Without the
warm-up the first round compares prepared statements with unprepared ones, which a consumer that
has been running for a minute no longer has (``--warmup 0`` for the old shape).

The plain loop handles every record, duplicates included (it cannot tell them apart), so it
inserts ``--dup-share`` more business rows than the dedup consumer.

``--ids v7``: the message ids are UUIDv7 (time-ordered), what ``Outbox.add`` gives every message the
relay sends, and the seeded history holds earlier v7 ids; the lines printed then start with
``consumer_v7_``. The default, ``v4``, is random ids (a foreign producer's), the harder case for the
processed-messages index: every insert lands on a random leaf page.

Targets (issue 14, P5): dedup >= 0.9 x baseline; no dead tuples from duplicates.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from consumers import DedupConsumer, KafkaRunner
from outbox.ids import uuid7
from outbox.schema import default_tables


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "bench_events"
    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(sa.String(64))
    key: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    payload: Mapped[bytes] = mapped_column(sa.LargeBinary)


def handler(session: Session, message_id: str | None, key: str | None, payload: bytes) -> None:
    """The business effect, shared by both consumers: one row per message."""
    session.add(Event(message_id=message_id or "", key=key, payload=payload))


class Sink(DedupConsumer):
    name = "bench.sink"

    def handle(self, session, message):
        handler(session, message.id, message.key, message.payload)


class TimedRunner(KafkaRunner):
    """Stops once ``target`` messages are settled; times first batch -> last offset commit."""

    target = 0
    t_first = 0.0
    t_last = 0.0
    settled = 0

    def process(self, batch):
        if not self.t_first:
            self.t_first = time.perf_counter()
        return super().process(batch)

    def _commit(self, kc, outcomes):
        super()._commit(kc, outcomes)
        self.settled += sum(1 for o in outcomes if o.done)
        if self.settled >= self.target:
            self.t_last = time.perf_counter()
            self.stop()


def new_id(id_kind: str) -> str:
    """A message id: ``v7`` time-ordered (what ``Outbox.add`` makes), ``v4`` random."""
    return str(uuid7()) if id_kind == "v7" else str(uuid.uuid4())


def produce(bootstrap: str, topic: str, n: int, keys: int, dup_share: float, id_kind: str = "v4") -> int:
    rnd = random.Random(42)
    sent: list[tuple[bytes, bytes, bytes]] = []
    dups = 0
    producer = Producer(b.kafka_producer_conf(bootstrap))
    for i in range(n):
        if sent and rnd.random() < dup_share:
            k, v, mid = sent[rnd.randrange(len(sent))]
            dups += 1
        else:
            k, v, mid = b.key_of(i, keys).encode(), b.payload_bytes(i), new_id(id_kind).encode()
            sent.append((k, v, mid))
        while True:
            try:
                producer.produce(topic, value=v, key=k, headers=[("message-id", mid)])
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1000 == 999:
            producer.poll(0)
    if producer.flush(60):
        raise SystemExit("produce: messages left unconfirmed")
    return dups


def record_fields(m: Any) -> tuple[str, str | None, bytes]:
    """A raw record's (message-id header, key, value), as the baselines hand them to the handler."""
    key = m.key()
    return (dict(m.headers() or []).get("message-id", b"").decode(), key.decode() if key is not None else None,
            bytes(m.value() or b""))


def next_offsets(msgs: list[Any]) -> list[TopicPartition]:
    """The offsets to commit after ``msgs``: one past the last of each partition."""
    upto: dict[tuple[str, int], int] = {}
    for m in msgs:
        upto[(m.topic(), m.partition())] = m.offset() + 1
    return [TopicPartition(t, p, o) for (t, p), o in upto.items()]


def baseline(engine, bootstrap: str, topic: str, n: int, batch: int, conf: dict) -> float:
    kc = Consumer({**conf, "bootstrap.servers": bootstrap, "group.id": f"bench-plain-{uuid.uuid4().hex[:6]}",
                   "enable.auto.commit": False, "enable.auto.offset.store": False})
    kc.subscribe([topic])
    seen = 0
    t_first = 0.0
    try:
        while seen < n:
            msgs = [m for m in kc.consume(batch, 0.5) if m.error() is None]
            if not msgs:
                continue
            if not t_first:
                t_first = time.perf_counter()
            with Session(engine) as s, s.begin():
                for m in msgs:
                    handler(s, *record_fields(m))
            kc.commit(offsets=next_offsets(msgs), asynchronous=False)
            seen += len(msgs)
        return time.perf_counter() - t_first
    finally:
        kc.close()


def dead_tuples(engine) -> dict[str, int]:
    """n_dead_tup (and n_live_tup, to show the statistics did arrive) per table."""
    names = {"processed": default_tables().processed.name, "events": Event.__tablename__}
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        out = {}
        for label, table in names.items():
            dead, live = conn.execute(
                sa.text("SELECT n_dead_tup, n_live_tup FROM pg_stat_user_tables WHERE relname = :t"), {"t": table}
            ).one()
            out[label] = int(dead)
            out[f"{label}_live"] = int(live)
        conn.rollback()
    return out


def seed_history(engine, consumer: str, rows: int, id_kind: str = "v4") -> None:
    """Give the processed-messages table ``rows`` earlier ids of this consumer, then ANALYZE it.

    ``v7``: ids of the last ``rows`` milliseconds before now (one a millisecond, the rest of each
    random), so they sort before the run's ids as a consumer's history does.

    A production table has history and statistics. Without statistics (a new table, or autovacuum
    off) PostgreSQL reads the duplicates' stored results by scanning every row of the consumer, so
    the dedup consumer would slow down as the table grows (see docs/benchmarks.md).
    """
    t = default_tables().processed
    if rows:
        if id_kind == "v7":
            # the random uuid with its first 48 bits (8 + 4 hex digits) replaced by a millisecond
            # timestamp, and its version digit by 7
            g = sa.func.generate_series(1, rows).column_valued("g")
            ms = sa.func.lpad(sa.func.to_hex(
                sa.cast(sa.extract("epoch", sa.func.now()) * 1000, sa.BigInteger) - rows + g), 12, "0")
            rand = sa.cast(sa.func.gen_random_uuid(), sa.String)
            mid = (sa.func.substr(ms, 1, 8) + "-" + sa.func.substr(ms, 9, 4) + "-7"
                   + sa.func.substr(rand, 16, 21))
            sel = sa.select(sa.literal(consumer), mid, sa.func.now())
        else:
            sel = sa.select(sa.literal(consumer), sa.cast(sa.func.gen_random_uuid(), sa.String),
                            sa.func.now()).select_from(sa.func.generate_series(1, rows))
        with engine.begin() as conn:
            conn.execute(t.insert().from_select(["consumer", "message_id", "processed_at"], sel))
    b.vacuum(engine)


def flush_stats(engine) -> None:
    """Backends report their table statistics when they exit: close the pool, then wait for it."""
    engine.dispose()
    time.sleep(1.0)


def main() -> None:
    p = b.parser(__doc__ or "", n=200_000, keys=1000, warmup=150_000)
    p.add_argument("--consumer-batch", type=int, default=500, help="messages per DB transaction (both sides)")
    p.add_argument("--dup-share", type=float, default=0.10)
    p.add_argument("--history", type=int, default=200_000,
                   help="earlier processed ids in the table before the run (PostgreSQL; then ANALYZE)")
    p.add_argument("--profile", metavar="PATH", help="sample the dedup consumer run with py-spy into PATH")
    p.add_argument("--rounds", type=int, default=3, help="dedup and plain passes over the topic, alternating "
                   "which goes first; medians are printed")
    p.add_argument("--ids", choices=["v4", "v7"], default="v4",
                   help="message ids: v4 random (a foreign producer's), v7 time-ordered (what Outbox.add makes)")
    args = b.parse(p)
    if args.db != "postgresql":
        b.note("dead-tuple counts are PostgreSQL-only; throughput is still measured")
    conf = {"session.timeout.ms": 6000, "auto.offset.reset": "earliest"}
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        Base.metadata.create_all(engine)
        pg = args.db == "postgresql"
        names = [Sink.name if r == 0 else f"{Sink.name}.{r + 1}" for r in range(args.rounds)]
        if pg:
            for name in names:  # all before the first dead-tuple reading (seeding ends with VACUUM ANALYZE)
                seed_history(engine, name, args.history, args.ids)
            with engine.begin() as conn:
                for t in (default_tables().processed.name, Event.__tablename__):
                    conn.execute(sa.text(f'ALTER TABLE "{t}" SET (autovacuum_enabled = false)'))
        topic = b.create_topic(bootstrap)
        t0 = time.perf_counter()
        dups = produce(bootstrap, topic, args.n, args.keys, args.dup_share, args.ids)
        b.note(f"produced {args.n} ({dups} duplicates) in {time.perf_counter() - t0:.1f} s")
        if args.warmup:
            warm(engine, bootstrap, args, conf)
        before = dead_tuples(engine) if pg else {}
        dedup_rates: list[float] = []
        plain_rates: list[float] = []
        for r in range(args.rounds):
            # each round: a fresh consumer name (fresh ids, its own seeded history) and fresh groups;
            # dedup and plain alternate which goes first
            name = names[r]
            sides = ["dedup", "plain"] if r % 2 == 0 else ["plain", "dedup"]
            for side in sides:
                with b.frozen_heap():  # as `outbox consume` runs its loop, on both sides
                    if side == "plain":
                        plain_rates.append(args.n / baseline(engine, bootstrap, topic, args.n, args.consumer_batch,
                                                             conf))
                    else:
                        dedup_rates.append(args.n / dedup_run(engine, bootstrap, topic, args, conf, name, dups))
                b.note(f"round {r + 1} {side}: {(plain_rates if side == 'plain' else dedup_rates)[-1]:.0f} msg/s")
        if pg:
            flush_stats(engine)
        after = dead_tuples(engine) if pg else {}

    dedup_rate, plain_rate = statistics.median(dedup_rates), statistics.median(plain_rates)
    c = "consumer" if args.ids == "v4" else f"consumer_{args.ids}"  # v7 runs print lines of their own
    b.emit(f"{c}_db", args.db)
    b.emit(f"{c}_messages", args.n)
    b.emit(f"{c}_rounds", args.rounds)
    b.emit(f"{c}_warmup_messages", args.warmup)
    b.emit(f"{c}_history_rows", args.history if args.db == "postgresql" else 0)
    b.emit(f"{c}_duplicates", dups)
    b.emit(f"{c}_dedup_msgs_per_s", dedup_rate)
    b.emit(f"baseline_plain_{c}_msgs_per_s", plain_rate)
    b.emit(f"{c}_dedup_vs_plain_ratio", b.ratio(dedup_rate, plain_rate))
    b.emit(f"{c}_dedup_vs_plain_ratio_per_round",
           " ".join(f"{d / p:.3f}" for d, p in zip(dedup_rates, plain_rates, strict=True)))
    if pg:
        for label in ("processed", "events"):
            b.emit(f"{c}_{label}_table_n_dead_tup_before", before[label])
            b.emit(f"{c}_{label}_table_n_dead_tup_after", after[label])
            b.emit(f"{c}_{label}_table_n_live_tup_after", after[f"{label}_live"])


def warm(engine, bootstrap: str, args, conf: dict) -> None:
    """``--warmup`` messages through each side once, untimed (its own topic and consumer name)."""
    topic = b.create_topic(bootstrap)
    t0 = time.perf_counter()
    dups = produce(bootstrap, topic, args.warmup, args.keys, args.dup_share, args.ids)
    baseline(engine, bootstrap, topic, args.warmup, args.consumer_batch, conf)
    dedup_run(engine, bootstrap, topic, args, conf, f"{Sink.name}.warmup", dups, n=args.warmup)
    b.note(f"warm-up: {args.warmup} messages through each side in {time.perf_counter() - t0:.1f} s")


def dedup_run(engine, bootstrap: str, topic: str, args, conf: dict, name: str, dups: int,
              n: int | None = None) -> float:
    """One KafkaRunner + DedupConsumer pass over the topic as consumer ``name``: seconds, first batch to last commit."""
    runner = TimedRunner(Sink(name=name), engine=engine, bootstrap_servers=bootstrap, topics=[topic],
                         group_id=f"bench-dedup-{uuid.uuid4().hex[:6]}", config=conf,
                         batch_size=args.consumer_batch, requeue_interval=None)
    profile = args.profile if n is None else None  # the timed rounds only, not the warm-up
    n = args.n if n is None else n
    runner.target = n
    with b.profiled(profile):
        runner.run()
    stats = runner.stats
    if stats.processed != n - dups or stats.duplicates != dups:
        raise SystemExit(f"dedup consumer: {stats}, expected {n - dups} processed, {dups} duplicates")
    return runner.t_last - runner.t_first


if __name__ == "__main__":
    main()
