"""A relay frozen inside its claim transaction must not keep its partitions forever (liveness).

Every claim transaction locks the relay's lease rows (``LeaseManager.lock_for_claim``) until the
batch is marked, and a takeover skips locked lease rows. A relay frozen (SIGSTOP here; a VM pause
or a vanished host in production) right after its claim keeps that transaction, and so those
locks, open on the server for as long as the freeze lasts. Before the fix no other relay could
take its partitions over: the rows of the frozen batch (and everything after them) were never
published. The fix: the relay's own sessions carry an idle-in-transaction bound derived from its
config (:func:`outbox.config.RelayConfig.idle_transaction_timeout`), so the database ends the
frozen transaction and releases the locks; and a relay that wakes with a batch older than it may
publish rolls back instead of publishing it.

Relay A (``_frozen_child.py``, ``freeze=after_claim``) claims a batch and stops itself; relay B
starts next to it and must publish everything, A's batch included, within the bound plus a few
lease periods. Then A is woken: it must not publish its stale batch, and per key the first
deliveries (read back from the broker) stay in outbox-id order.
"""

from __future__ import annotations

import collections
import json
import signal
import time

import pytest
import sqlalchemy as sa

from outbox.config import RelayConfig

from .conftest import TABLES, declare_queue, wait_until, write
from .test_frozen_relay import Child, keys_out_of_order

TTL = 3.0
PUBLISH_TIMEOUT = 2.0
KEYS = 20
N = 600


def _seqs_by_id(engine: sa.Engine) -> dict[int, int]:
    o = TABLES.outbox
    with engine.connect() as conn:
        return {i: json.loads(p)["seq"] for i, p in conn.execute(sa.select(o.c.id, o.c.payload))}


@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_a_relay_frozen_in_its_claim_transaction_is_taken_over_and_does_not_publish_when_it_wakes(
        dialect, db, rabbitmq_url, amqp_names, rabbit_reader, tmp_path):
    d = db(dialect)
    exchange, queue = amqp_names["exchange"], amqp_names["queue"]
    declare_queue(rabbitmq_url, exchange, queue)
    reader = rabbit_reader(rabbitmq_url, queue)
    bound = RelayConfig(lease_ttl=TTL, publish_timeout=PUBLISH_TIMEOUT).idle_transaction_timeout
    write(d.engine, exchange, range(N), keys=KEYS)
    spec = {"url": d.url, "rabbitmq": rabbitmq_url, "lease_ttl": TTL, "publish_timeout": PUBLISH_TIMEOUT,
            "batch_size": 100}
    a = Child({**spec, "relay_id": "A", "freeze": "after_claim"}, tmp_path / "a.log")
    b = None
    try:
        batch_ids = set(a.event("frozen", timeout=90)["ids"])
        batch = {seq for i, seq in _seqs_by_id(d.engine).items() if i in batch_ids}  # ids -> seqs
        assert batch and len(batch) == len(batch_ids)
        frozen_at = time.monotonic()
        b = Child({**spec, "relay_id": "B", "freeze": "none"}, tmp_path / "b.log")
        b.event("started", timeout=60)
        # B can take A's partitions once A's leases lapsed (TTL) and the database ended A's
        # transaction (bound); allow a few lease periods on top for joining and rebalancing.
        limit = bound + 4 * TTL + 10
        wait_until(lambda: d.rows() == 0, timeout=limit,
                   what=f"B to take the frozen relay's partitions over and publish every row (A's batch of "
                        f"{len(batch)} included); B's log:\n{b.log()[-2000:]}")
        took = time.monotonic() - frozen_at
        print(f"takeover_and_drain_seconds: {took:.1f} (bound {bound:.1f} s)")
        reader.wait_seqs(set(range(N)), 60)
        delivered_before_wake = collections.Counter(m.seq for m in reader.got)
        a.proc.send_signal(signal.SIGCONT)
        a.event("woke", timeout=30)
        wait_until(lambda: "stale batch" in a.log(), 30, "the woken relay to drop its stale batch")
        write(d.engine, exchange, range(N, N + 200), keys=KEYS)  # A (back in the group) and B share these
        wait_until(lambda: d.rows() == 0, timeout=90, what="the rows written after A woke")
        got = reader.wait_seqs(set(range(N + 200)), 60)
        reader.poll(1.0)
    finally:
        for c in (a, b):
            if c is not None:
                c.stop()
    after = collections.Counter(m.seq for m in got)
    resent = sorted(i for i in batch if after[i] > delivered_before_wake[i])
    assert not resent, f"the woken relay published {len(resent)} rows of its stale batch: {resent[:10]}"
    assert "Traceback" not in a.log(), a.log()[-3000:]
    bad = keys_out_of_order(got)
    assert not bad, f"{len(bad)} of {KEYS} keys out of order; first: {next(iter(bad.items()))}"
