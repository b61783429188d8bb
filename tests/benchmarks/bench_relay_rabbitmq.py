"""Scenario 2: drain a backlog to a durable RabbitMQ queue with publisher confirms, against a raw
pika publisher with a window of asynchronous confirms (same message count, size and properties).

Baseline: ``pika.SelectConnection`` (the asynchronous adapter) driven by its own ioloop; it keeps
up to ``--window`` (default 1000, the relay publisher's ``confirm_window``) messages unconfirmed and
tops the window up on every ``basic.ack`` (which RabbitMQ often sends with ``multiple=True``).
Messages are persistent (``delivery_mode=2``), ``mandatory``, with ``message_id``, ``content_type``,
``timestamp`` and a ``message-id`` header, as the relay's RabbitMQPublisher sends them.

Target: relay->RabbitMQ >= 0.9 x baseline (P2 of the speed issue; the first benchmarks issue asked 0.7 x).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import pika
import pika.spec

from outbox.brokers import RabbitMQPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay


def setup_queue(url: str, exchange: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    ch.queue_declare(queue=queue, durable=True)
    ch.queue_bind(queue=queue, exchange=exchange, routing_key="#")
    conn.close()


def queue_depth_and_purge(url: str, queue: str, delete: bool = False) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    depth = ch.queue_declare(queue=queue, durable=True, passive=True).method.message_count
    if delete:
        ch.queue_delete(queue=queue)
    else:
        ch.queue_purge(queue=queue)
    conn.close()
    return int(depth)


def raw_publish(url: str, exchange: str, n: int, keys: int, window: int) -> float:
    """Publish ``n`` messages with at most ``window`` unconfirmed; returns seconds (connect excluded)."""
    msgs = [(b.key_of(i, keys), b.payload_bytes(i), str(uuid.uuid4())) for i in range(n)]
    state = {"sent": 0, "acked": 0, "nacked": 0, "returned": 0, "t0": 0.0, "t1": 0.0}
    outstanding: dict[int, int] = {}  # delivery tag -> 1
    chan_box: dict[str, object] = {}

    def pump() -> None:
        ch = chan_box["ch"]
        while state["sent"] < n and len(outstanding) < window:
            i = state["sent"]
            key, payload, mid = msgs[i]
            props = pika.BasicProperties(delivery_mode=2, message_id=mid, content_type="application/octet-stream",
                                         headers={"message-id": mid}, timestamp=int(time.time()))
            ch.basic_publish(exchange, key, payload, props, mandatory=True)  # type: ignore[attr-defined]
            state["sent"] += 1
            outstanding[state["sent"]] = 1

    def on_confirm(frame) -> None:
        m = frame.method
        tags = [t for t in outstanding if t <= m.delivery_tag] if m.multiple else [m.delivery_tag]
        for t in tags:
            outstanding.pop(t, None)
        key = "acked" if isinstance(m, pika.spec.Basic.Ack) else "nacked"
        state[key] += len(tags)
        if state["acked"] + state["nacked"] >= n:
            state["t1"] = time.perf_counter()
            conn.close()
            return
        pump()

    def on_return(_ch, _method, _props, _body) -> None:
        state["returned"] += 1

    def on_channel(ch) -> None:
        chan_box["ch"] = ch
        ch.add_on_return_callback(on_return)

        def confirmed(_f) -> None:
            state["t0"] = time.perf_counter()
            pump()

        ch.confirm_delivery(on_confirm, callback=confirmed)

    conn = pika.SelectConnection(pika.URLParameters(url), on_open_callback=lambda c: c.channel(
        on_open_callback=on_channel), on_close_callback=lambda c, r: c.ioloop.stop())
    with b.frozen_heap():  # as the relay's side is timed
        conn.ioloop.start()
    if state["acked"] != n or state["returned"]:
        raise SystemExit(f"raw pika: {state}")
    return state["t1"] - state["t0"]


def relay_drain(args, exchange: str, queue: str, *, pipeline: bool) -> float:
    """Drain a fresh backlog of ``args.n`` rows with one relay; returns its rate (msg/s)."""
    with b.bench_database(args.db) as engine:
        fill = b.fill_backlog(engine, args.n, keys=args.keys, topic=exchange)
        b.note(f"backlog of {args.n} written in {fill:.1f} s")
        publisher = RabbitMQPublisher(url=args.rabbitmq, declare_exchanges=True, confirm_window=args.window)
        relay = Relay(engine, publisher, config=RelayConfig(batch_size=args.batch_size, progress_interval=0,
                                                            pipeline=pipeline))
        relay.start()
        with b.frozen_heap():  # as `outbox relay` runs its loop
            t0 = time.perf_counter()
            n_relay = relay.drain()
            t_relay = time.perf_counter() - t0
        relay.close()
        depth = queue_depth_and_purge(args.rabbitmq, queue)
        if n_relay != args.n or depth != args.n:
            raise SystemExit(f"relay published {n_relay}, queue holds {depth}, expected {args.n}")
    return args.n / t_relay


def main() -> None:
    p = b.parser(__doc__ or "", n=200_000, keys=1000)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--rabbitmq", default=b.RABBITMQ_URL)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of the three sides (order reversed every other round; default 3, medians reported)")
    args = b.parse(p)
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}-q"
    setup_queue(args.rabbitmq, exchange, queue)
    rates: dict[str, list[float]] = {"relay": [], "relay_no_pipeline": [], "raw": []}

    def raw() -> float:
        t_raw = raw_publish(args.rabbitmq, exchange, args.n, args.keys, args.window)
        depth_raw = queue_depth_and_purge(args.rabbitmq, queue)
        if depth_raw != args.n:
            raise SystemExit(f"raw pika: queue holds {depth_raw}, expected {args.n}")
        return args.n / t_raw

    sides = {"relay": lambda: relay_drain(args, exchange, queue, pipeline=True),
             "relay_no_pipeline": lambda: relay_drain(args, exchange, queue, pipeline=False),
             "raw": raw}
    try:
        for r in range(max(1, args.rounds)):
            for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                rates[name].append(sides[name]())
                b.note(f"round {r + 1}: {name} {rates[name][-1]:,.0f} msg/s")
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(args.rabbitmq))
        ch = conn.channel()
        ch.queue_delete(queue=queue)
        ch.exchange_delete(exchange=exchange)
        conn.close()
    relay_rate, flat_rate, raw_rate = (statistics.median(rates[k]) for k in ("relay", "relay_no_pipeline", "raw"))
    # each round's relay against the same round's raw loop, as bench_relay_kafka.py pairs them
    ratios = [b.ratio(r, w) for r, w in zip(rates["relay"], rates["raw"], strict=True)]
    flat_ratios = [b.ratio(r, w) for r, w in zip(rates["relay_no_pipeline"], rates["raw"], strict=True)]
    b.emit("relay_rabbitmq_db", args.db)
    b.emit("relay_rabbitmq_rounds", len(ratios))
    b.emit("relay_rabbitmq_msgs_per_s", relay_rate)
    b.emit("relay_rabbitmq_no_pipeline_msgs_per_s", flat_rate)
    b.emit("baseline_raw_pika_confirms_msgs_per_s", raw_rate)
    b.emit("relay_rabbitmq_vs_raw_pika_ratios", " ".join(f"{r:.3f}" for r in ratios))
    b.emit("relay_rabbitmq_vs_raw_pika_ratio", statistics.median(ratios))
    b.emit("relay_rabbitmq_no_pipeline_vs_raw_pika_ratios", " ".join(f"{r:.3f}" for r in flat_ratios))
    b.emit("relay_rabbitmq_no_pipeline_vs_raw_pika_ratio", statistics.median(flat_ratios))
    b.emit("relay_rabbitmq_pipeline_vs_no_pipeline_ratio", b.ratio(relay_rate, flat_rate))


if __name__ == "__main__":
    main()
