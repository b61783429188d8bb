"""Scenario 3: commit-to-broker latency under a steady write load.

Writer threads commit ``--rate`` messages per second (one message per transaction by default) for
``--seconds`` seconds; each payload carries the time just before its commit, and the writer notes
the time its commit returned. A relay runs in its own process (``Relay.run``, Kafka publisher). A
reader thread consumes the topic with ``assign()`` and notes when each message arrives; latency =
receive time - commit-return time (same machine, same clock). Run twice: PostgreSQL NOTIFY
wake-ups on (``Outbox(notify=True)``, ``RelayConfig(notify=True)``) and off (polling, with the
relay's idle wait growing from ``min_poll_interval`` to ``--poll-interval``).

Targets: p99 <= 20 ms with wake-ups on; p99 <= poll interval + 20 ms with them off.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from sqlalchemy.orm import Session

from outbox import Outbox


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


class Reader(threading.Thread):
    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.received: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-lat-{uuid.uuid4().hex[:6]}",
                           "enable.auto.commit": False, "fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
        parts = sorted(self.c.list_topics(topic, timeout=10).topics[topic].partitions)
        self.c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])

    def run(self) -> None:
        try:
            self.ready.set()
            while not self.stop_event.is_set():
                for m in self.c.consume(1000, 0.05):
                    now = time.time()
                    if m.error() is None:
                        mid = dict(m.headers() or []).get("message-id", b"").decode()
                        self.received.setdefault(mid, now)
        finally:
            self.c.close()


def _writer_process(url: str, topic: str, notify: bool, tx_rate: float, seconds: float, per_tx: int,
                    start_at: float, w: int, out) -> None:
    """One writer process: ``tx_rate`` transactions per second from wall time ``start_at``."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, pool_size=2)
    outbox = Outbox(notify=notify)
    local: dict[str, float] = {}
    behind = 0
    k = 0
    with Session(engine) as warm, warm.begin():  # connect before the clock starts
        pass
    while True:
        due = start_at + k / tx_rate
        if due - start_at >= seconds:
            break
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.05:
            behind += 1
        with Session(engine) as s, s.begin():
            ids = []
            for j in range(per_tx):
                stamp = f"{time.time():.6f}|".encode()
                ids.append(outbox.add(s, topic, stamp + b"x" * (b.PAYLOAD_SIZE - len(stamp)),
                                      key=f"key-{(w * 7919 + k * per_tx + j) % 1000:05d}"))
        done = time.time()
        for i in ids:
            local[str(i)] = done
        k += 1
    engine.dispose()
    out.put((local, time.time() - start_at, behind))


def write_load(url: str, topic: str, notify: bool, rate: float, seconds: float, writers: int,
               per_tx: int) -> tuple[dict[str, float], float]:
    """Commit ``rate`` msg/s for ``seconds`` from ``writers`` processes (no GIL shared with the reader).

    Returns message id -> commit-return time, and how long the writing took.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0  # time for the processes to start and connect
    procs = [ctx.Process(target=_writer_process, args=(url, topic, notify, rate / per_tx / writers, seconds, per_tx,
                                                        start_at, w, out)) for w in range(writers)]
    for p in procs:
        p.start()
    committed: dict[str, float] = {}
    took = 0.0
    for _ in procs:
        local, spent, _behind = out.get(timeout=seconds + 120)
        committed.update(local)
        took = max(took, spent)
    for p in procs:
        p.join(30)
    return committed, took


def broker_floor(bootstrap: str, rate: float, seconds: float) -> dict[str, float]:
    """Baseline: raw produce (KafkaPublisher's settings) -> the same reader, at the same rate."""
    from confluent_kafka import Producer

    topic = b.create_topic(bootstrap)
    reader = Reader(bootstrap, topic)
    reader.start()
    reader.ready.wait(10)
    producer = Producer(b.kafka_producer_conf(bootstrap))
    producer.list_topics(topic, timeout=10)
    sent: dict[str, float] = {}
    warm = int(rate)  # the first second warms the topic up and is not counted
    n = int(rate * seconds) + warm
    t0 = time.time()
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        mid = str(uuid.uuid4())
        producer.produce(topic, value=b.payload_bytes(i), key=b.key_of(i, 1000).encode(),
                         headers=[("message-id", mid.encode())])
        if i >= warm:
            sent[mid] = time.time()
        producer.poll(0)
    producer.flush(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not sent.keys() <= reader.received.keys():
        time.sleep(0.05)
    reader.stop_event.set()
    reader.join(10)
    lat = sorted((reader.received[m] - t) * 1000 for m, t in sent.items() if m in reader.received)
    return {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99), "max": lat[-1] if lat else float("nan")}


def phase(engine, bootstrap: str, args, notify: bool) -> dict[str, float]:
    topic = b.create_topic(bootstrap)
    log = Path(tempfile.gettempdir()) / f"bench-acked-{uuid.uuid4().hex[:8]}.json"
    child = b.relay_child(b.url_of(engine), publisher="kafka", bootstrap=bootstrap, mode="run",
                          batch_size=args.batch_size, notify=notify, poll_interval=args.poll_interval,
                          published_log=str(log))
    try:
        b.child_line(child, "ready")
        reader = Reader(bootstrap, topic)
        reader.start()
        reader.ready.wait(10)
        committed, wrote_for = write_load(b.url_of(engine), topic, notify, args.rate, args.seconds, args.writers,
                                          args.per_tx)
        deadline = time.monotonic() + args.poll_interval + 30
        while time.monotonic() < deadline and not committed.keys() <= reader.received.keys():
            time.sleep(0.05)
        reader.stop_event.set()
        reader.join(10)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            b.child_line(child, "done", timeout=30)
        finally:
            child.wait(30)
    lat = sorted((reader.received[m] - t) * 1000 for m, t in committed.items() if m in reader.received)
    acked = json.loads(log.read_text()) if log.exists() else {}
    log.unlink(missing_ok=True)
    ack = sorted((acked[m] - t) * 1000 for m, t in committed.items() if m in acked)
    return {
        "ack_p50": percentile(ack, 0.50),
        "ack_p99": percentile(ack, 0.99),
        "ack_max": ack[-1] if ack else float("nan"),
        "messages": len(committed),
        "missing": len(committed) - len(lat),
        "rate": len(committed) / max(wrote_for, 1e-9),
        "p50": percentile(lat, 0.50),
        "p99": percentile(lat, 0.99),
        "max": lat[-1] if lat else float("nan"),
    }


def main() -> None:
    p = b.parser(__doc__ or "", seconds=30)
    p.add_argument("--rate", type=int, default=1000, help="messages committed per second")
    p.add_argument("--poll-interval", type=float, default=1.0, help="the relay's poll_interval with wake-ups off")
    p.add_argument("--writers", type=int, default=2, help="writer processes")
    p.add_argument("--per-tx", type=int, default=1, help="messages per writer transaction")
    args = b.parse(p)
    modes = [True, False] if args.db == "postgresql" else [False]
    with b.bench_database(args.db) as engine, b.kafka_broker(args.kafka) as bootstrap:
        results = {mode: phase(engine, bootstrap, args, mode) for mode in modes}
        floor = broker_floor(bootstrap, args.rate, min(args.seconds, 10))
    b.emit("latency_db", args.db)
    b.emit("latency_seconds", args.seconds)
    b.emit("latency_poll_interval_s", args.poll_interval)
    b.emit("baseline_broker_produce_to_receive_p50_ms", floor["p50"])
    b.emit("baseline_broker_produce_to_receive_p99_ms", floor["p99"])
    b.emit("baseline_broker_produce_to_receive_max_ms", floor["max"])
    for mode, r in results.items():
        tag = "notify_on" if mode else "notify_off"
        b.emit(f"latency_{tag}_messages", r["messages"])
        b.emit(f"latency_{tag}_missing", r["missing"])
        b.emit(f"latency_{tag}_write_rate_msgs_per_s", r["rate"])
        b.emit(f"latency_{tag}_p50_ms", r["p50"])
        b.emit(f"latency_{tag}_p99_ms", r["p99"])
        b.emit(f"latency_{tag}_max_ms", r["max"])
        b.emit(f"latency_{tag}_commit_to_ack_p50_ms", r["ack_p50"])
        b.emit(f"latency_{tag}_commit_to_ack_p99_ms", r["ack_p99"])
        b.emit(f"latency_{tag}_commit_to_ack_max_ms", r["ack_max"])


if __name__ == "__main__":
    main()
