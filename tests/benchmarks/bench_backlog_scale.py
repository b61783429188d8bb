"""Scenario 6: does a huge backlog slow the relay down or blow up its memory?

The relay drains a ``--large`` (1,000,000) row backlog and a ``--small`` (10,000) row one, each in
its own process (``ru_maxrss`` of that process is its peak RSS), to the no-op publisher and, with
``--kafka-too``, to Kafka. Reports throughput for both, the ratio large / small and the peak RSS.

A 10k drain lasts a fraction of a second, so one of them is at the mercy of whatever else the
machine does at that moment. Each of ``--rounds`` (3) rounds therefore drains the large backlog
once between two groups of ``--small-repeats`` (3) small drains (the group after one large drain is
the group before the next), and the round's ratio is the large rate over the median of the small
drains on either side of it. Reported: the median small and large rates, the median of the
rounds' ratios, the largest peak RSS, and the large drain's rate per ``--segment`` (100,000) rows
of the median round (first, slowest, last segment): a drain that slows down as the table empties
shows there.

The backlog is written with one server-side ``INSERT ... SELECT generate_series`` per 100,000 rows
on PostgreSQL (``--fill server``, the default there) or ``Outbox.add_many`` in chunks of 10,000
(``--fill add_many``, the only choice on MariaDB), then vacuumed and analysed; the setup time is
reported, not counted.

Targets: ratio >= 0.9; peak RSS <= 150 MB.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b


def drain_in_child(
    engine, publisher: str, bootstrap: str | None, batch_size: int, segment: int = 0
) -> tuple[float, float, list[float]]:
    """(msgs/s, peak RSS in MB, rate of each ``segment`` rows) of a relay process draining the table."""
    child = b.relay_child(
        b.url_of(engine), publisher=publisher, bootstrap=bootstrap, batch_size=batch_size, timeline=segment
    )
    try:
        b.child_line(child, "ready")
        done = b.child_line(child, "done", timeout=3600)
    finally:
        child.wait(60)
    start, end = float(done["start"]), float(done["end"])
    rate = float(done["published"]) / (end - start)
    stamps = [start, *(float(t) for t in done.get("timeline", []))]  # type: ignore[union-attr]
    segments = [segment / (t1 - t0) for t0, t1 in itertools.pairwise(stamps) if t1 > t0]
    return rate, float(done["maxrss_kb"]) / 1024, segments


def one_drain(
    engine, args, fill: str, publisher: str, bootstrap: str | None, topic: str, size: int, segment: int = 0
) -> tuple[float, float, float, list[float]]:
    """(setup s, msgs/s, peak RSS MB, segment rates) of one fill and drain of ``size`` rows."""
    setup = b.fill_backlog(engine, size, keys=args.keys, topic=topic, method=fill)
    rate, rss, segments = drain_in_child(engine, publisher, bootstrap, args.batch_size, segment)
    left = b.pending_count(engine)
    if left:
        raise SystemExit(f"{left} rows left after the drain")
    b.note(f"{publisher}: {size} rows written in {setup:.1f} s, drained at {rate:.0f} msg/s, peak RSS {rss:.1f} MB")
    return setup, rate, rss, segments


def main() -> None:
    p = b.parser(__doc__ or "", large=1_000_000, small=10_000, keys=1000, segment=100_000)
    p.add_argument("--fill", choices=("server", "add_many"), default=None)
    p.add_argument("--kafka-too", action="store_true", help="also drain both backlogs to Kafka")
    p.add_argument("--rounds", type=int, default=3, help="large drains, each between two groups of small ones")
    p.add_argument("--small-repeats", type=int, default=3, help="small drains per group")
    args = b.parse(p)
    if args.quick:
        args.small = max(args.small, 10_000)  # the small side stays 10k; only the large side shrinks
        args.rounds = min(args.rounds, 1)
    fill = args.fill or ("server" if args.db == "postgresql" else "add_many")
    targets = [("null", None)]
    b.emit("backlog_db", args.db)
    b.emit("backlog_fill_method", fill)
    b.emit("backlog_small_rows", args.small)
    b.emit("backlog_large_rows", args.large)
    b.emit("backlog_rounds", args.rounds)
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka if args.kafka_too else "unused") as bs:
        if args.kafka_too:
            targets.append(("kafka", bs))
        for publisher, bootstrap in targets:
            topic = b.create_topic(bootstrap) if bootstrap else b.TOPIC

            def smalls(publisher=publisher, bootstrap=bootstrap, topic=topic) -> list[float]:
                return [
                    one_drain(engine, args, fill, publisher, bootstrap, topic, args.small)[1]
                    for _ in range(args.small_repeats)
                ]

            small_rates: list[float] = []
            large_rates: list[float] = []
            ratios: list[float] = []
            peak = 0.0
            setups: list[float] = []
            timelines: list[list[float]] = []
            before = smalls()
            small_rates += before
            for _ in range(args.rounds):
                setup, rate, rss, segments = one_drain(
                    engine, args, fill, publisher, bootstrap, topic, args.large, args.segment
                )
                after = smalls()
                small_rates += after
                setups.append(setup)
                large_rates.append(rate)
                timelines.append(segments)
                peak = max(peak, rss)
                ratios.append(b.ratio(rate, statistics.median(before + after)))
                before = after
            b.emit("backlog_large_setup_s", statistics.median(setups))
            b.emit(f"backlog_{publisher}_small_msgs_per_s", statistics.median(small_rates))
            b.emit(f"backlog_{publisher}_large_msgs_per_s", statistics.median(large_rates))
            b.emit(f"backlog_{publisher}_peak_rss_mb", peak)
            b.emit(f"backlog_{publisher}_round_ratios", " ".join(f"{r:.3f}" for r in ratios))
            mid = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
            if timelines[mid]:
                segs = timelines[mid]
                b.emit(
                    f"backlog_{publisher}_large_segment_msgs_per_s",
                    f"first {segs[0]:.0f}, slowest {min(segs):.0f}, last {segs[-1]:.0f} (per {args.segment:,} rows)",
                )
            b.emit(f"backlog_{publisher}_large_vs_small_ratio", statistics.median(ratios))


if __name__ == "__main__":
    main()
