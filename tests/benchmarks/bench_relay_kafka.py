"""Scenario 1: drain a backlog to Kafka, against the raw limits measured in the same run:

(a) the tightest honest claim+delete loop on the driver directly (``_bench.raw_claim_delete``:
    ``SELECT ... ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED``, ``DELETE ... WHERE id = ANY(...)``,
    ``COMMIT``), the database's floor;
(b) raw confluent-kafka idempotent produce (acks=all) of the same messages, the broker's floor;
and, for reference, the relay with a no-op publisher (the toolkit's own claim+delete path).

``--rounds`` (default 3) alternates them and the medians are printed. ``--size`` sets the payload
(200 B default; 1024 for the 1 KiB figures).

Targets (issue 14, P1): relay->Kafka >= 0.9 x (a); >= 50,000 msg/s at 200 B.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
from confluent_kafka import Producer

from outbox.brokers import KafkaPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay


def drain(engine, publisher, batch_size: int, profile: str | None = None) -> tuple[int, float]:
    relay = Relay(engine, publisher, config=RelayConfig(batch_size=batch_size, progress_interval=0))
    relay.start()  # connect, take leases: not timed
    with b.frozen_heap(), b.profiled(profile):
        t0 = time.perf_counter()
        n = relay.drain()
        took = time.perf_counter() - t0
    relay.close()
    return n, took


def raw_produce(bootstrap: str, topic: str, n: int, keys: int, size: int = b.PAYLOAD_SIZE) -> float:
    msgs = [(b.key_of(i, keys).encode(), b.payload_bytes(i, size), [("message-id", str(uuid.uuid4()).encode()),
                                                                ("content-type", b"application/octet-stream")])
            for i in range(n)]
    producer = Producer(b.kafka_producer_conf(bootstrap))
    producer.list_topics(topic, timeout=10)
    delivered = [0, 0]

    def on_delivery(err, _msg) -> None:
        delivered[0 if err is None else 1] += 1

    with b.frozen_heap():
        t0 = time.perf_counter()
        for i, (k, v, h) in enumerate(msgs):
            while True:
                try:
                    producer.produce(topic, value=v, key=k, headers=h, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)
            if i % 128 == 127:
                producer.poll(0)
        left = producer.flush(60)
        took = time.perf_counter() - t0
    if left or delivered[1] or delivered[0] != n:
        raise SystemExit(f"raw produce: {delivered[0]} delivered, {delivered[1]} failed, {left} left")
    return took


def _timed_drain(relay: Relay) -> tuple[int, float, float]:
    """(messages, wall seconds, process CPU seconds: every thread, librdkafka's and the endpoint's too)."""
    relay.start()  # connect, take leases: not timed
    with b.frozen_heap():
        c0, t0 = time.process_time(), time.perf_counter()
        n = relay.drain()
        took, cpu = time.perf_counter() - t0, time.process_time() - c0
    relay.close()
    return n, took, cpu


def drain_measured(engine, bootstrap: str, batch_size: int, measured: bool) -> tuple[int, float, float]:
    """The relay to Kafka; ``measured``: with everything ``--http`` turns on: the metrics decorator,
    the row-gauge poller (default 5 s interval), the endpoint, and a scraper reading /metrics every second."""
    import threading
    import urllib.request

    relay = Relay(engine, KafkaPublisher(bootstrap_servers=bootstrap),
                  config=RelayConfig(batch_size=batch_size, progress_interval=0))
    if not measured:
        return _timed_drain(relay)
    from outbox.observability.serve import serve_relay

    stop_http = serve_relay(relay, "127.0.0.1:0")
    url = f"http://127.0.0.1:{relay.metrics_server.port}/metrics"
    done = threading.Event()

    def scrape() -> None:
        while not done.wait(1.0):
            with urllib.request.urlopen(url, timeout=5) as resp:
                resp.read()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        return _timed_drain(relay)
    finally:
        done.set()
        stop_http()


def metrics_comparison(args) -> None:
    """``--metrics``: the relay to Kafka with metrics off and on, alternately, ``--rounds`` times each.

    Wall-clock throughput on a shared machine is noisy; messages per CPU second of the relay process
    (all its threads) is printed too, as the steadier figure of the overhead."""
    import statistics

    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        topic = b.create_topic(bootstrap)
        for i in range(args.rounds):
            # alternate which goes first: the drain after another drain's 200k deletes meets the
            # autovacuum that they trigger, and must not always be the same kind
            for measured in ((False, True) if i % 2 == 0 else (True, False)):
                b.fill_backlog(engine, args.n, keys=args.keys, topic=topic)
                n, took, used = drain_measured(engine, bootstrap, args.batch_size, measured)
                if n != args.n:
                    raise SystemExit(f"drained {n} of {args.n}")
                wall[measured].append(n / took)
                cpu[measured].append(n / used)
    ratios = [a / c for a, c in zip(wall[True], wall[False], strict=True)]
    cpu_ratios = [a / c for a, c in zip(cpu[True], cpu[False], strict=True)]
    b.emit("relay_kafka_db", args.db)
    b.emit("relay_kafka_metrics_rounds", args.rounds)
    b.emit("relay_kafka_metrics_messages", args.n)
    b.emit("relay_kafka_metrics_off_msgs_per_s", statistics.median(wall[False]))
    b.emit("relay_kafka_metrics_on_msgs_per_s", statistics.median(wall[True]))
    b.emit("relay_kafka_metrics_on_vs_off_ratios", " ".join(f"{r:.3f}" for r in ratios))
    b.emit("relay_kafka_metrics_on_vs_off_ratio_median", b.ratio(statistics.median(ratios), 1.0))
    b.emit("relay_kafka_metrics_off_msgs_per_cpu_s", statistics.median(cpu[False]))
    b.emit("relay_kafka_metrics_on_msgs_per_cpu_s", statistics.median(cpu[True]))
    b.emit("relay_kafka_metrics_on_vs_off_cpu_ratios", " ".join(f"{r:.3f}" for r in cpu_ratios))
    b.emit("relay_kafka_metrics_on_vs_off_cpu_ratio_median", b.ratio(statistics.median(cpu_ratios), 1.0))


def main() -> None:
    import statistics

    p = b.parser(__doc__ or "", n=100_000, keys=1000)
    p.add_argument("--codec", default="native", help="the relay's codec: native, cloudevents, debezium")
    p.add_argument("--size", type=int, default=b.PAYLOAD_SIZE, help="payload bytes (default 200)")
    p.add_argument("--fill", choices=("server", "add_many"), default=None,
                   help="how the backlog is written (default: server on PostgreSQL, add_many on MariaDB)")
    p.add_argument("--profile", metavar="PREFIX",
                   help="sample the drains of the first round with py-spy: PREFIX-claim-delete.txt, "
                        "PREFIX-relay-kafka.txt")
    p.add_argument("--metrics", action="store_true",
                   help="instead: relay throughput with metrics (--http) off and on, same run, median of --rounds")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each measurement (default 3)")
    args = b.parse(p)
    if args.metrics:
        metrics_comparison(args)
        return
    fill_method = args.fill or ("server" if args.db == "postgresql" else "add_many")
    rates: dict[str, list[float]] = {"raw": [], "null": [], "kafka": [], "produce": []}
    fill = 0.0
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        topic = b.create_topic(bootstrap)
        for rnd in range(args.rounds):
            prof = (lambda what: f"{args.profile}-{what}.txt") if args.profile and rnd == 0 else (lambda what: None)
            # (a) the raw claim+delete loop
            fill = b.fill_backlog(engine, args.n, keys=args.keys, topic=topic, method=fill_method, size=args.size)
            n_r, t_r = b.raw_claim_delete(engine, args.batch_size)
            # the relay's own claim+delete path (no-op publisher)
            b.fill_backlog(engine, args.n, keys=args.keys, topic=topic, method=fill_method, size=args.size)
            n_a, t_a = drain(engine, b.NullPublisher(), args.batch_size, prof("claim-delete"))
            # the relay to Kafka
            b.fill_backlog(engine, args.n, keys=args.keys, topic=topic, method=fill_method, size=args.size)
            n_k, t_k = drain(engine, KafkaPublisher(bootstrap_servers=bootstrap, codec=args.codec),
                             args.batch_size, prof("relay-kafka"))
            if n_r != args.n or n_a != args.n or n_k != args.n or b.pending_count(engine):
                raise SystemExit(f"drained {n_r} / {n_a} / {n_k} of {args.n}, {b.pending_count(engine)} left")
            # (b) raw produce
            raw_topic = b.create_topic(bootstrap)
            t_b = raw_produce(bootstrap, raw_topic, args.n, args.keys, args.size)
            for name, rate in (("raw", n_r / t_r), ("null", n_a / t_a), ("kafka", n_k / t_k),
                               ("produce", args.n / t_b)):
                rates[name].append(rate)
            b.note(f"round {rnd + 1}: raw loop {n_r / t_r:.0f}, relay null {n_a / t_a:.0f}, "
                   f"relay kafka {n_k / t_k:.0f}, raw produce {args.n / t_b:.0f} msg/s")

    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [k / r for k, r in zip(rates["kafka"], rates["raw"], strict=True)]
    b.emit("relay_kafka_db", args.db)
    b.emit("relay_kafka_codec", args.codec)
    b.emit("relay_kafka_payload_bytes", args.size)
    b.emit("relay_kafka_rounds", args.rounds)
    b.emit("relay_kafka_backlog_write_s", fill)
    b.emit("relay_kafka_msgs_per_s", med["kafka"])
    b.emit("baseline_raw_claim_delete_msgs_per_s", med["raw"])
    b.emit("baseline_relay_null_publisher_msgs_per_s", med["null"])
    b.emit("baseline_raw_produce_msgs_per_s", med["produce"])
    b.emit("relay_kafka_vs_raw_claim_delete_ratios", " ".join(f"{r:.3f}" for r in ratios))
    b.emit("relay_kafka_vs_raw_claim_delete_ratio", b.ratio(statistics.median(ratios), 1.0))
    b.emit("relay_null_vs_raw_claim_delete_ratio", b.ratio(med["null"], med["raw"]))
    b.emit("relay_kafka_vs_raw_produce_ratio", b.ratio(med["kafka"], med["produce"]))


if __name__ == "__main__":
    main()
