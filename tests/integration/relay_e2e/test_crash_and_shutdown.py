"""A relay killed mid-batch loses nothing; SIGTERM/SIGINT stop a relay cleanly and hand its work on."""

from __future__ import annotations

import signal

import pytest

from .conftest import cli_json, first_occurrences_in_order, relay_args, wait_until, write


def test_sigkill_mid_batch_then_a_second_relay_delivers_everything(db, kafka_bootstrap, kafka_topic, kafka_reader,
                                                                    start_relay):
    d = db("postgresql")
    n = 20_000
    write(d.engine, kafka_topic, range(n), keys=50)
    reader = kafka_reader(kafka_bootstrap, kafka_topic)
    broker = ("--kafka", kafka_bootstrap)
    r1 = start_relay(*relay_args(d.url, *broker, relay_id="r1", batch=200), name="r1")
    reader.wait_count(500, 60)
    r1.kill()  # SIGKILL: no batch finished, no lease released
    assert r1.proc.returncode == -signal.SIGKILL
    assert 0 < d.pending() < n, "the relay was not killed mid-run"
    assert set(d.lease_owners().values()) == {"r1"}

    r2 = start_relay(*relay_args(d.url, *broker, relay_id="r2", batch=1000), name="r2")
    got = reader.wait_seqs(set(range(n)), timeout=120)
    first_occurrences_in_order(got)
    wait_until(lambda: d.rows() == 0, 30, "every row to be deleted")

    def moved() -> dict | None:
        st = cli_json("status", "--db", d.url)
        return st if set(st["partition_owners"]) == {"r2"} else None

    st = wait_until(moved, 30, "every partition to move to r2")
    assert sorted(st["partition_owners"]["r2"]) == list(range(32))
    assert st["unowned_partitions"] == []
    alive = {r["relay_id"]: r["alive"] for r in st["relays"]}
    assert alive.get("r2") is True
    assert alive.get("r1", False) is False, "the killed relay still shows as alive"
    assert st["pending"] == 0
    assert r2.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_releases_leases_and_loses_nothing(sig, db, kafka_bootstrap, kafka_topic, kafka_reader,
                                                                start_relay):
    d = db("postgresql")
    n = 10_000
    write(d.engine, kafka_topic, range(n), keys=20)
    reader = kafka_reader(kafka_bootstrap, kafka_topic)
    broker = ("--kafka", kafka_bootstrap)
    r1 = start_relay(*relay_args(d.url, *broker, relay_id="r1", batch=100), name="r1")
    reader.wait_count(300, 60)
    assert r1.stop(sig) == 0, r1.log()[-2000:]
    assert f"received {signal.Signals(sig).name}" in r1.log()
    assert "r1" not in d.lease_owners().values(), "the stopped relay kept leases"
    assert "r1" not in d.relay_ids(), "the stopped relay is still registered"
    write(d.engine, kafka_topic, range(n, n + 100), keys=20)  # committed after the stop

    r2 = start_relay(*relay_args(d.url, *broker, relay_id="r2"), name="r2")
    got = reader.wait_seqs(set(range(n + 100)), timeout=120)
    first_occurrences_in_order(got)
    wait_until(lambda: d.rows() == 0, 30, "every row to be deleted")
    assert r2.stop(sig) == 0
    assert all(owner is None for owner in d.lease_owners().values())
