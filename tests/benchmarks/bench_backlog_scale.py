"""Scenario 6: does a huge backlog slow the relay down or blow up its memory?

The relay drains a ``--large`` (1,000,000) row backlog and a ``--small`` (10,000) row one, each in
its own process (``ru_maxrss`` of that process is its peak RSS), to the no-op publisher and, with
``--kafka-too``, to Kafka. Reports throughput for both, the ratio large / small and the peak RSS.

The backlog is written with one server-side ``INSERT ... SELECT generate_series`` per 100,000 rows
on PostgreSQL (``--fill server``, the default there) or ``Outbox.add_many`` in chunks of 10,000
(``--fill add_many``, the only choice on MariaDB); the setup time is reported.

Targets: ratio >= 0.9; peak RSS <= 150 MB.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b


def drain_in_child(engine, publisher: str, bootstrap: str | None, batch_size: int) -> tuple[float, float]:
    """(msgs/s, peak RSS in MB) of a relay process draining the table."""
    child = b.relay_child(b.url_of(engine), publisher=publisher, bootstrap=bootstrap, batch_size=batch_size)
    try:
        b.child_line(child, "ready")
        done = b.child_line(child, "done", timeout=3600)
    finally:
        child.wait(60)
    rate = float(done["published"]) / (float(done["end"]) - float(done["start"]))
    return rate, float(done["maxrss_kb"]) / 1024


def main() -> None:
    p = b.parser(__doc__ or "", large=1_000_000, small=10_000, keys=1000)
    p.add_argument("--fill", choices=("server", "add_many"), default=None)
    p.add_argument("--kafka-too", action="store_true", help="also drain both backlogs to Kafka")
    args = b.parse(p)
    if args.quick:
        args.small = max(args.small, 10_000)  # the small side stays 10k; only the large side shrinks
    fill = args.fill or ("server" if args.db == "postgresql" else "add_many")
    targets = [("null", None)]
    b.emit("backlog_db", args.db)
    b.emit("backlog_fill_method", fill)
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka if args.kafka_too else "unused") as bs:
        if args.kafka_too:
            targets.append(("kafka", bs))
        for publisher, bootstrap in targets:
            topic = b.create_topic(bootstrap) if bootstrap else b.TOPIC
            rates = {}
            for size in (args.small, args.large):
                setup = b.fill_backlog(engine, size, keys=args.keys, topic=topic, method=fill)
                b.note(f"{publisher}: backlog of {size} written in {setup:.1f} s")
                rate, rss = drain_in_child(engine, publisher, bootstrap, args.batch_size)
                left = b.pending_count(engine)
                if left:
                    raise SystemExit(f"{left} rows left after the drain")
                rates[size] = rate
                label = "large" if size == args.large else "small"
                b.emit(f"backlog_{label}_rows", size)
                b.emit(f"backlog_{label}_setup_s", setup)
                b.emit(f"backlog_{publisher}_{label}_msgs_per_s", rate)
                b.emit(f"backlog_{publisher}_{label}_peak_rss_mb", rss)
            b.emit(f"backlog_{publisher}_large_vs_small_ratio", b.ratio(rates[args.large], rates[args.small]))


if __name__ == "__main__":
    main()
