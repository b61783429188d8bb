"""Three ``outbox relay`` processes share one outbox while relays start and stop and writers keep writing."""

from __future__ import annotations

import pytest

from .conftest import first_occurrences_in_order, relay_args, wait_until, write

KEYS = 200
CHUNK = 4000


@pytest.mark.slow
@pytest.mark.parametrize("dialect", ["postgresql", "mariadb"])
def test_three_relays_started_and_stopped_during_the_run(dialect, db, kafka_bootstrap, kafka_topic, kafka_reader,
                                                         start_relay):
    d = db(dialect)
    reader = kafka_reader(kafka_bootstrap, kafka_topic)
    chunks = iter(range(0, 5 * CHUNK, CHUNK))

    def write_chunk() -> None:
        start = next(chunks)
        write(d.engine, kafka_topic, range(start, start + CHUNK), keys=KEYS)

    def owners() -> set[str | None]:
        return set(d.lease_owners().values())

    def relay(name: str):
        return start_relay(*relay_args(d.url, "--kafka", kafka_bootstrap, relay_id=name, batch=500), name=name)

    write_chunk()
    write_chunk()
    r1 = relay("r1")
    reader.wait_count(1, 60)
    write_chunk()
    r2 = relay("r2")
    wait_until(lambda: owners() == {"r1", "r2"}, 30, "r1 and r2 to share the partitions")
    write_chunk()
    assert r1.stop() == 0, r1.log()[-2000:]
    r3 = relay("r3")
    write_chunk()
    wait_until(lambda: owners() == {"r2", "r3"}, 30, "r2 and r3 to share the partitions")

    got = reader.wait_seqs(set(range(5 * CHUNK)), timeout=180)
    firsts = first_occurrences_in_order(got)
    assert len(firsts) == KEYS
    assert sum(len(v) for v in firsts.values()) == 5 * CHUNK
    wait_until(lambda: d.rows() == 0, 30, "every row to be deleted")
    for r in (r2, r3):
        assert r.stop() == 0, r.log()[-2000:]
    assert "r1" not in d.relay_ids()
    assert all(owner is None for owner in d.lease_owners().values())
