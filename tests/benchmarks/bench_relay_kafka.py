"""Scenario 1: drain a backlog to Kafka, against (a) the same relay with a no-op publisher and
(b) raw confluent-kafka idempotent produce (acks=all) of the same messages.

Targets: relay->Kafka >= 50,000 msg/s and >= 0.6 x baseline (a).
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
    with b.profiled(profile):
        t0 = time.perf_counter()
        n = relay.drain()
        took = time.perf_counter() - t0
    relay.close()
    return n, took


def raw_produce(bootstrap: str, topic: str, n: int, keys: int) -> float:
    msgs = [(b.key_of(i, keys).encode(), b.payload_bytes(i), [("message-id", str(uuid.uuid4()).encode()),
                                                                ("content-type", b"application/octet-stream")])
            for i in range(n)]
    producer = Producer(b.kafka_producer_conf(bootstrap))
    producer.list_topics(topic, timeout=10)
    delivered = [0, 0]

    def on_delivery(err, _msg) -> None:
        delivered[0 if err is None else 1] += 1

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


def main() -> None:
    p = b.parser(__doc__ or "", n=200_000, keys=1000)
    p.add_argument("--codec", default="native", help="the relay's codec: native, cloudevents, debezium")
    p.add_argument("--profile", metavar="PREFIX",
                   help="sample both drains with py-spy: PREFIX-claim-delete.txt, PREFIX-relay-kafka.txt")
    args = b.parse(p)
    prof = (lambda what: f"{args.profile}-{what}.txt") if args.profile else (lambda what: None)
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        topic = b.create_topic(bootstrap)
        # (a) the claim-and-delete loop alone
        fill = b.fill_backlog(engine, args.n, keys=args.keys, topic=topic)
        b.note(f"backlog of {args.n} written in {fill:.1f} s")
        n_a, t_a = drain(engine, b.NullPublisher(), args.batch_size, prof("claim-delete"))
        # the relay to Kafka
        b.fill_backlog(engine, args.n, keys=args.keys, topic=topic)
        n_k, t_k = drain(engine, KafkaPublisher(bootstrap_servers=bootstrap, codec=args.codec),
                     args.batch_size, prof("relay-kafka"))
        if n_a != args.n or n_k != args.n or b.pending_count(engine):
            raise SystemExit(f"drained {n_a} / {n_k} of {args.n}, {b.pending_count(engine)} left")
        # (b) raw produce
        raw_topic = b.create_topic(bootstrap)
        t_b = raw_produce(bootstrap, raw_topic, args.n, args.keys)

    relay_rate, a_rate, b_rate = n_k / t_k, n_a / t_a, args.n / t_b
    b.emit("relay_kafka_db", args.db)
    b.emit("relay_kafka_codec", args.codec)
    b.emit("relay_kafka_backlog_write_s", fill)
    b.emit("relay_kafka_msgs_per_s", relay_rate)
    b.emit("baseline_claim_delete_msgs_per_s", a_rate)
    b.emit("baseline_raw_produce_msgs_per_s", b_rate)
    b.emit("relay_kafka_vs_claim_delete_ratio", b.ratio(relay_rate, a_rate))
    b.emit("relay_kafka_vs_raw_produce_ratio", b.ratio(relay_rate, b_rate))


if __name__ == "__main__":
    main()
