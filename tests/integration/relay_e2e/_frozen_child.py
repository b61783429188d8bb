"""A relay process that can freeze itself (SIGSTOP) at a chosen point of its first busy round.

Test code only: the hook is a subclass of :class:`~outbox.relay.Relay` defined here, so the
production module has no switch for it. Usage (see test_frozen_relay.py)::

    python _frozen_child.py '{"url": ..., "bootstrap": ..., "relay_id": "A", "freeze": "after_claim",
                              "batch_size": 100, "lease_ttl": 3, "publish_timeout": 2}'

(``"rabbitmq": URL`` instead of ``"bootstrap"`` publishes to RabbitMQ.)

Points (``freeze``):

- ``after_claim``: right after the claim returned rows (their locks held), before publishing;
- ``mid_publish``: after the first half of the batch was published (broker acks in hand);
- ``before_mark``: after the whole batch was published, before the rows are marked;
- ``before_claim``: at the start of the second busy round, before its transaction (stale leases);
- ``none``: never.

Before stopping itself it prints one JSON line ``{"event": "frozen", "ids": [...], "keys": [...]}``
(the rows of the batch in hand, or none for ``before_claim``) on stdout. ``pg_options`` (e.g.
``"-c idle_in_transaction_session_timeout=6000"``) is passed to PostgreSQL connections. SIGTERM stops the relay
cleanly; ``{"event": "done", ...}`` is printed at the end.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from outbox.brokers import KafkaPublisher, RabbitMQPublisher
from outbox.brokers.base import PublishResult
from outbox.config import RelayConfig
from outbox.message import OutboxRecord
from outbox.relay import Relay


def say(event: str, **kw: Any) -> None:
    print(json.dumps({"event": event, **kw}), flush=True)


class FreezingRelay(Relay):
    def __init__(self, *args: Any, freeze: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.freeze = freeze
        self.busy_rounds = 0
        self.frozen = False

    def _stop_here(self, records: Sequence[OutboxRecord]) -> None:
        if self.frozen:
            return
        self.frozen = True
        say("frozen", point=self.freeze, ids=[r.id for r in records], keys=sorted({str(r.key) for r in records}),
            partitions=sorted({r.partition for r in records}))
        os.kill(os.getpid(), signal.SIGSTOP)
        say("woke", point=self.freeze)

    def run_once(self) -> int:
        if self.freeze == "before_claim" and self.busy_rounds == 1:
            self._stop_here([])
        n = super().run_once()
        if n:
            self.busy_rounds += 1
        return n

    def _claim(self, *args: Any, **kwargs: Any) -> list[OutboxRecord]:
        records = super()._claim(*args, **kwargs)
        if records and self.freeze == "after_claim":
            self._stop_here(records)
        return records

    def _begin_publish(self, records: list[OutboxRecord]) -> Callable[[], list[PublishResult]]:
        if self.frozen or self.freeze not in ("mid_publish", "before_mark"):
            return super()._begin_publish(records)
        if self.freeze == "mid_publish":
            half = max(1, len(records) // 2)
            first = self._verdicts(records[:half], super()._begin_publish(records[:half]))
            self._stop_here(records)
            rest = self._verdicts(records[half:], super()._begin_publish(records[half:]))
            return lambda: first + rest
        results = self._verdicts(records, super()._begin_publish(records))
        self._stop_here(records)
        return lambda: results


def main() -> None:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=spec.get("log_level", "INFO"), stream=sys.stderr,
                        format="%(asctime)s " + spec["relay_id"] + " %(levelname)s %(message)s")
    connect_args = {"options": spec["pg_options"]} if spec.get("pg_options") else {}
    engine = sa.create_engine(spec["url"], pool_pre_ping=True, connect_args=connect_args)
    if spec.get("rabbitmq"):
        publisher: Any = RabbitMQPublisher(url=spec["rabbitmq"], declare_exchanges=True)
    else:
        publisher = KafkaPublisher(bootstrap_servers=spec["bootstrap"])
    config = RelayConfig(relay_id=spec["relay_id"], batch_size=spec.get("batch_size", 100),
                         lease_ttl=spec.get("lease_ttl", 3.0), publish_timeout=spec.get("publish_timeout", 2.0),
                         poll_interval=0.1, progress_interval=0)
    relay = FreezingRelay(engine, publisher, config=config, freeze=spec.get("freeze", "none"))
    signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    say("started")
    stats = relay.run()
    say("done", **stats.as_dict())


if __name__ == "__main__":
    main()
