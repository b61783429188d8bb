"""Scenario 7: 1, 2 and 4 relay processes on the same backlog to Kafka.

For each relay count the backlog (``--n`` messages over ``--keys`` keys) is written, the relays
start as separate processes, register, take their fair share of the partitions (a barrier makes
sure every one of them is registered first, so nobody grabs everything), and then all start
draining at once. Throughput = messages / (last relay done - first relay started).

Then the topic is read back (``assign()``): every message id of the backlog must be there, and for
each key the first occurrences of its message ids must come in the order they were written
(outbox id order). Duplicates are counted but allowed (at-least-once).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import sqlalchemy as sa

from outbox.schema import default_tables


def run_relays(engine, bootstrap: str, count: int, batch_size: int) -> tuple[float, int]:
    url = b.url_of(engine)
    children = [b.relay_child(url, publisher="kafka", bootstrap=bootstrap, batch_size=batch_size, barrier=True)
                for _ in range(count)]
    try:
        for c in children:
            b.child_line(c, "registered")
        for c in children:
            b.send(c, "go")
        held = [int(b.child_line(c, "ready")["partitions"]) for c in children]
        b.note(f"{count} relay(s) hold {held} partitions")
        for c in children:
            b.send(c, "start")
        done = [b.child_line(c, "done", timeout=3600) for c in children]
    finally:
        for c in children:
            c.wait(60)
    published = sum(int(d["published"]) for d in done)
    took = max(float(d["end"]) for d in done) - min(float(d["start"]) for d in done)
    return published / took, published


def check_order(engine, bootstrap: str, topic: str, expected: dict[str, tuple[int, str]]) -> tuple[int, int, int]:
    """(missing, duplicates, keys out of order) reading ``topic`` back."""
    got = b.read_topic(bootstrap, topic, len(expected))
    seen: set[str] = set()
    dups = 0
    last_id: dict[str, int] = {}
    bad_keys: set[str] = set()
    for _part, key, mid in got:
        if mid in seen:
            dups += 1
            continue
        seen.add(mid)
        oid, k = expected.get(mid, (None, None))
        if oid is None or k != key:
            bad_keys.add(key)
            continue
        if oid < last_id.get(key, -1):
            bad_keys.add(key)
        last_id[key] = oid
    missing = len(set(expected) - seen)
    return missing, dups, len(bad_keys)


def main() -> None:
    p = b.parser(__doc__ or "", n=200_000, keys=1000)
    p.add_argument("--relays", default="1,2,4", help="comma-separated relay counts")
    args = b.parse(p)
    counts = [int(x) for x in args.relays.split(",")]
    o = default_tables().outbox
    b.emit("relays_db", args.db)
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        for count in counts:
            topic = b.create_topic(bootstrap, partitions=8)
            b.fill_backlog(engine, args.n, keys=args.keys, topic=topic)
            with engine.connect() as conn:
                expected = {str(r.message_id): (r.id, r.key) for r in conn.execute(sa.select(o.c.id, o.c.message_id,
                                                                                              o.c.key))}
            rate, published = run_relays(engine, bootstrap, count, args.batch_size)
            left = b.pending_count(engine)
            missing, dups, bad = check_order(engine, bootstrap, topic, expected)
            b.emit(f"relays_{count}_msgs_per_s", rate)
            b.emit(f"relays_{count}_published", published)
            b.emit(f"relays_{count}_left_in_outbox", left)
            b.emit(f"relays_{count}_missing_in_kafka", missing)
            b.emit(f"relays_{count}_duplicates_in_kafka", dups)
            b.emit(f"relays_{count}_keys_out_of_order", bad)
            if missing or bad or left:
                raise SystemExit(f"{count} relays: {missing} missing, {bad} keys out of order, {left} left")


if __name__ == "__main__":
    main()
