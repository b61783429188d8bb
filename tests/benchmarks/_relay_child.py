"""One relay in its own process, driven by a benchmark over stdin/stdout (JSON lines).

Modes:

- ``drain``: publish until its partitions are empty, then print ``{"event": "done", ...}`` with
  published count, wall-clock start/end (``time.time()``) and peak RSS (``ru_maxrss``).
- ``run``: the daemon loop (``Relay.run``) until SIGTERM, then ``done`` as above.

With ``--barrier`` the child registers, prints ``registered``, waits for ``go`` (every sibling has
registered by then), takes its fair share of partitions, prints ``ready`` and waits for ``start``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa
from _bench import NullPublisher

from outbox.cli._common import settle_daemon_heap
from outbox.config import RelayConfig
from outbox.relay import Relay


def say(event: str, **kw: object) -> None:
    print(json.dumps({"event": event, **kw}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--publisher", choices=("null", "kafka", "rabbitmq"), default="null")
    p.add_argument("--bootstrap")
    p.add_argument("--mode", choices=("drain", "run"), default="drain")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--poll-interval", type=float, default=1.0)
    p.add_argument("--notify", action="store_true")
    p.add_argument("--barrier", action="store_true")
    p.add_argument("--published-log", help="write {message_id: time acked} as JSON here at the end")
    p.add_argument("--timeline", type=int, default=0,
                   help="report the time (time.time()) at every N rows published, in done's 'timeline'")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    if args.publisher == "kafka":
        from outbox.brokers import KafkaPublisher

        publisher = KafkaPublisher(bootstrap_servers=args.bootstrap)
    elif args.publisher == "rabbitmq":
        from outbox.brokers import RabbitMQPublisher

        publisher = RabbitMQPublisher(url=args.bootstrap, declare_exchanges=True)
    else:
        publisher = NullPublisher()  # type: ignore[assignment]
    engine = sa.create_engine(args.url, pool_size=3)
    cfg = RelayConfig(batch_size=args.batch_size, poll_interval=args.poll_interval, notify=args.notify,
                      progress_interval=0)
    acked: dict[str, float] = {}

    def on_published(records) -> None:
        now = time.time()
        for r in records:
            acked[str(r.message_id)] = now

    timeline: list[float] = []
    count = [0, args.timeline]

    def on_timeline(records) -> None:
        count[0] += len(records)
        if count[0] >= count[1]:
            timeline.append(time.time())
            count[1] += args.timeline

    hook = on_published if args.published_log else on_timeline if args.timeline else None
    relay = Relay(engine, publisher, config=cfg, on_published=hook)

    if args.barrier:
        relay.leases.register()
        say("registered")
        sys.stdin.readline()  # go
    settle_daemon_heap()  # as `outbox relay` does before its loop
    relay.start()
    say("ready", partitions=len(relay.leases.held))
    if args.barrier:
        sys.stdin.readline()  # start

    start = time.time()
    if args.mode == "run":
        signal.signal(signal.SIGTERM, lambda *_: relay.stop())
        relay.run()
        published = relay.stats.published
    else:
        published = relay.drain()
        relay.close()
    end = time.time()
    say("done", published=published, start=start, end=end, rounds=relay.stats.rounds,
        maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, timeline=timeline)
    engine.dispose()
    if args.published_log:
        Path(args.published_log).write_text(json.dumps(acked))


if __name__ == "__main__":
    main()
