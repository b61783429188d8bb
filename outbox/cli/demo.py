"""``outbox demo``: the whole pipeline on embedded defaults, in about twenty seconds.

A SQLite file in a temporary folder, the bundled Kafka-protocol broker (tansu) as a child
process, a service writing orders with outbox messages, the relay publishing them, a dedup
consumer applying them, and a replay of already-delivered messages to show duplicates ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from ..errors import ConfigurationError

TOPIC = "demo.orders"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run writer, relay and a dedup consumer end to end on SQLite + a bundled broker"
    )
    p.add_argument("--orders", type=int, default=2000, help="orders to write (default 2000)")
    p.add_argument("--replay", type=int, default=200, help="already-delivered messages to send again (default 200)")
    p.add_argument("--kafka", metavar="SERVERS", help="use this Kafka instead of starting the bundled broker")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (SQLite file, broker log)")
    p.set_defaults(func=run)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.orders < 1 or args.replay < 0:
        raise ConfigurationError("--orders must be >= 1 and --replay >= 0")
    workdir = Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    try:
        return _run(args, workdir)
    finally:
        if args.keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path) -> int:
    import logging

    from consumers import DedupConsumer, IncomingMessage, KafkaRunner

    from .. import Outbox, OutgoingMessage, migrations
    from ..config import RelayConfig
    from ..devbroker import DevKafkaBroker
    from ..relay import Relay
    from ..transports.kafka.publisher import KafkaPublisher

    logging.getLogger().setLevel(logging.WARNING)  # the demo prints its own progress
    url = f"sqlite:///{workdir / 'demo.db'}"
    _say(f"database  {url}")
    engine = sa.create_engine(url, connect_args={"timeout": 30})
    migrations.upgrade(engine)
    meta = sa.MetaData()
    orders = sa.Table("demo_orders", meta, sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("customer", sa.String(50)), sa.Column("total", sa.Integer))
    shipments = sa.Table("demo_shipments", meta, sa.Column("order_id", sa.Integer, primary_key=True),
                         sa.Column("latency_ms", sa.Float))
    meta.create_all(engine)

    with contextlib.ExitStack() as stack:
        servers = args.kafka
        if not servers:
            try:
                broker = stack.enter_context(DevKafkaBroker(log_path=str(workdir / "tansu.log")))
            except ConfigurationError as exc:
                _say(f"error: {exc}")
                return 2
            servers = broker.bootstrap_servers
            _say(f"broker    bundled Kafka-protocol broker (tansu) on {servers}")
        else:
            _say(f"broker    Kafka at {servers}")
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": servers, "log_level": 3})
        for fut in admin.create_topics([NewTopic(TOPIC, num_partitions=4, replication_factor=1)]).values():
            with contextlib.suppress(Exception):  # already there
                fut.result(15)
        del admin

        class ShipOrder(DedupConsumer):
            name = "demo.ship-order"

            def handle(self, session: Session, message: IncomingMessage) -> Any:
                body = message.body
                if body.get("warmup"):
                    return None
                latency = (time.time() - body["written_at"]) * 1000
                session.execute(shipments.insert().values(order_id=body["order_id"], latency_ms=latency))
                return {"shipped": body["order_id"]}

        runner = KafkaRunner(ShipOrder(), engine=engine, bootstrap_servers=servers, topics=[TOPIC],
                             group_id="demo-shipping", batch_timeout=0.05,
                             config={"session.timeout.ms": 6000, "auto.offset.reset": "earliest", "log_level": 4,
                                     "fetch.wait.max.ms": 10})
        consumer_thread = threading.Thread(target=runner.run, name="consumer", daemon=True)
        consumer_thread.start()

        sample: list[Any] = []

        def keep_sample(records: Any) -> None:
            if len(sample) < args.replay:
                sample.extend(records[: args.replay - len(sample)])

        publisher = KafkaPublisher(bootstrap_servers=servers, config={"log_level": 4})
        relay = Relay(engine, publisher, config=RelayConfig(progress_interval=0, poll_interval=0.2),
                      on_published=keep_sample)
        relay_thread = threading.Thread(target=relay.run, name="relay", daemon=True)
        relay_thread.start()

        outbox = Outbox()
        rolled_back = 0
        _say("waiting   for the consumer to join its group (the bundled broker takes a few seconds)")
        with Session(engine) as s, s.begin():
            outbox.add(s, TOPIC, {"warmup": True}, key="warmup")
        deadline = time.monotonic() + 60
        while runner.stats.processed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting on the consumer's counter, with a deadline
        warm = runner.stats.processed
        _say(f"writing   {args.orders} orders, each with its outbox message in the same transaction")
        start = time.monotonic()
        written = 0
        next_show = 0.0
        while written < args.orders or runner.stats.processed - warm < args.orders:
            if written < args.orders:
                n = min(50, args.orders - written)
                with Session(engine) as s, s.begin():
                    rows = [{"id": written + i + 1, "customer": f"c{(written + i) % 25}", "total": 100 + i}
                            for i in range(n)]
                    s.execute(orders.insert(), rows)
                    outbox.add_many(s, [OutgoingMessage(TOPIC, {"order_id": r["id"], "customer": r["customer"],
                                                                "written_at": time.time()}, key=r["customer"])
                                        for r in rows])
                written += n
                time.sleep(0.02)  # pacing: a service taking about 2,500 orders/s, not a bulk load
                if written % 500 == 0:  # a failed transaction: its message must never be published
                    with contextlib.suppress(RuntimeError), Session(engine) as s, s.begin():
                        outbox.add(s, TOPIC, {"order_id": -1, "written_at": time.time()}, key="never")
                        rolled_back += 1
                        raise RuntimeError("payment declined")
            now = time.monotonic()
            if now >= next_show:
                _say(f"  written {written:>6}  published {relay.stats.published:>6}  "
                     f"consumed {runner.stats.processed - warm:>6}  duplicates ignored {runner.stats.duplicates:>4}")
                next_show = now + 0.25
            if now - start > 120:
                _say("error: the pipeline did not finish within 120 s")
                break
            if written >= args.orders:
                time.sleep(0.05)  # progress display cadence
        elapsed = time.monotonic() - start

        if sample:
            _say(f"replaying {len(sample)} messages that were already delivered (same message ids)")
            replayer = KafkaPublisher(bootstrap_servers=servers, config={"log_level": 4})
            replayer.start()
            replayer.publish(sample, timeout=30)
            replayer.close()
            deadline = time.monotonic() + 60
            while runner.stats.duplicates < len(sample) and time.monotonic() < deadline:
                time.sleep(0.05)

        relay.stop()
        runner.stop()
        relay_thread.join(30)
        consumer_thread.join(30)

        with engine.connect() as conn:
            effects = conn.execute(sa.select(sa.func.count()).select_from(shipments)).scalar_one()
            never = conn.execute(sa.select(sa.func.count()).select_from(shipments)
                                 .where(shipments.c.order_id == -1)).scalar_one()
            lat = sorted(conn.execute(sa.select(shipments.c.latency_ms)).scalars())
            dead = conn.execute(sa.select(sa.func.count()).select_from(outbox.tables.dead_letters)).scalar_one()
            dead += conn.execute(sa.select(sa.func.count()).select_from(outbox.tables.outbox)
                                 .where(outbox.tables.outbox.c.status == "dead")).scalar_one()

    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    ok = effects == args.orders and never == 0 and runner.stats.duplicates >= len(sample)
    _say("")
    _say("summary")
    _say(f"  orders written               {args.orders} (+{rolled_back} rolled back, never published)")
    _say(f"  messages published           {relay.stats.published - warm}")
    _say(f"  messages consumed            {runner.stats.processed - warm}")
    _say(f"  duplicates ignored           {runner.stats.duplicates} (of {len(sample)} replayed)")
    _say(f"  effects applied              {effects} (exactly one per order: {'yes' if ok else 'NO'})")
    _say(f"  dead letters                 {dead}")
    _say(f"  end-to-end latency           p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat[-1] if lat else 0:.1f} ms")
    _say(f"  throughput                   {args.orders / elapsed:.0f} orders/s end to end ({elapsed:.1f} s)")
    engine.dispose()
    if not ok:
        print("demo failed: see the counts above", file=sys.stderr)
        return 1
    return 0
