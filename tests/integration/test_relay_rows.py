"""Rows the relay cannot interpret, and database errors while marking a published batch.

Rows are hand-corrupted with SQL (as a person or a bad migration would), on every dialect. The
relay must never crash on a row: the row becomes ``dead`` with its reason, every other row goes
out, and a permanent database error while marking never republishes a delivered batch.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, admin, default_tables
from outbox.brokers.memory import MemoryPublisher
from outbox.config import RelayConfig
from outbox.relay import Relay
from outbox.writer import DEFAULT_PARTITIONS

T = default_tables().outbox
FAST = {"min_poll_interval": 0.01, "poll_interval": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2,
        "progress_interval": 0, "lease_ttl": 3.0}


def cfg(**kw: object) -> RelayConfig:
    return RelayConfig(**{**FAST, **kw})  # type: ignore[arg-type]


def write(engine: sa.Engine, n: int, *, keys: int = 10, topic: str = "orders") -> list[int]:
    """Commit ``n`` messages; return their row ids in order."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        mids = box.add_many(s, [OutgoingMessage(topic, {"seq": i}, key=f"k{i % keys}", headers={"h": "v"})
                                for i in range(n)])
    with engine.connect() as c:
        by_mid = {m: i for i, m in c.execute(sa.select(T.c.id, T.c.message_id))}
    return [by_mid[m] for m in mids]


def corrupt(engine: sa.Engine, row_id: int, sql_set: str, **params: object) -> None:
    """``UPDATE outbox_messages SET <sql_set> WHERE id = :row_id`` (a hand edit, raw SQL)."""
    with engine.begin() as c:
        c.execute(sa.text(f"UPDATE outbox_messages SET {sql_set} WHERE id = :row_id"), {"row_id": row_id, **params})


def row(engine: sa.Engine, row_id: int) -> sa.Row:
    with engine.connect() as c:
        return c.execute(sa.select(T.c.id, T.c.status, T.c.last_error, T.c.attempts, T.c.partition)
                         .where(T.c.id == row_id)).one()


def remaining(engine: sa.Engine) -> list[int]:
    with engine.connect() as c:
        return list(c.execute(sa.select(T.c.id).order_by(T.c.id)).scalars())


JSON_STRING = {"postgresql": "'\"x\"'::jsonb", "mariadb": "'\"x\"'", "sqlite": "'\"x\"'"}
JSON_LIST = {"postgresql": "'[\"a\", \"b\"]'::jsonb", "mariadb": "'[\"a\", \"b\"]'", "sqlite": "'[\"a\", \"b\"]'"}


@pytest.mark.parametrize("value, what", [(JSON_STRING, "a JSON string"), (JSON_LIST, "a JSON array")],
                         ids=["string", "list"])
def test_headers_not_an_object_dead_with_reason_others_delivered(
    engine: sa.Engine, dialect_name: str, value: dict[str, str], what: str
) -> None:
    ids = write(engine, 20)
    bad = ids[7]
    corrupt(engine, bad, f"headers = {value[dialect_name]}")
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg(ordering="none"))
    relay.drain()  # crashed with AttributeError before the fix
    relay.close()
    r = row(engine, bad)
    assert r.status == "dead"
    assert f"row {bad}: headers must be a JSON object of strings, got {what}" in r.last_error
    assert sorted(pub.published_ids) == sorted(i for i in ids if i != bad)
    assert remaining(engine) == [bad]
    assert relay.stats.dead == 1
    assert bad in {d["id"] for d in admin.list_dead(engine)}


def test_bad_row_holds_back_its_key_in_strict_mode(engine: sa.Engine) -> None:
    ids = write(engine, 20, keys=5)
    bad = ids[2]  # key k2; ids[7], ids[12], ids[17] share it
    corrupt(engine, bad, "headers = :h", h=json.dumps(["nope"]))
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg())
    relay.drain()
    relay.close()
    assert row(engine, bad).status == "dead"
    same_key = {ids[7], ids[12], ids[17]}
    assert set(pub.published_ids) == set(ids) - same_key - {bad}
    assert set(remaining(engine)) == same_key | {bad}


def test_relay_run_survives_a_bad_row(engine: sa.Engine, dialect_name: str) -> None:
    """The daemon loop: before the fix it exited with AttributeError on the first claim."""
    import threading

    ids = write(engine, 10)
    corrupt(engine, ids[0], f"headers = {JSON_STRING[dialect_name]}")
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg(ordering="none"))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            relay.run()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert pub.wait_for(9, timeout=30)
    finally:
        relay.stop()
        t.join(30)
    assert not errors
    assert row(engine, ids[0]).status == "dead"


# ------------------------------------------------------------------ rows no claim can reach (issue 9.8a/8b)


def lease_count(engine: sa.Engine) -> int:
    le = default_tables().leases
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(le)).scalar_one())


@pytest.mark.parametrize("partition", [-1, 40000], ids=["negative", "over-smallint"])
def test_partition_out_of_range_goes_dead_and_requeue_rederives_it(
    engine: sa.Engine, dialect_name: str, partition: int
) -> None:
    if partition > 32767 and dialect_name != "sqlite":
        pytest.skip("SMALLINT refuses it: only SQLite can hold such a row")
    ids = write(engine, 10)
    bad = ids[3]
    key_partition = row(engine, bad).partition
    corrupt(engine, bad, f"{quoted(dialect_name, 'partition')} = :p", p=partition)
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg(ordering="none"))
    relay.drain()
    r = row(engine, bad)
    assert r.status == "dead", "before the fix the row stayed pending (reported due) for ever"
    assert f"partition {partition} is out of range 0..{DEFAULT_PARTITIONS - 1}" in r.last_error
    assert lease_count(engine) == DEFAULT_PARTITIONS  # the bad row did not make the relay create 40001 leases
    assert sorted(pub.published_ids) == sorted(set(ids) - {bad})
    assert [d["id"] for d in admin.list_dead(engine)] == [bad]
    assert admin.requeue_dead(engine, ids=[bad]) == 1
    assert row(engine, bad).partition == key_partition  # the partition of its key, as the writer computed it
    relay.drain()
    relay.close()
    assert pub.published_ids[-1] == bad
    assert remaining(engine) == []


def test_unknown_status_counted_marked_dead_with_old_status_and_requeued(engine: sa.Engine) -> None:
    ids = write(engine, 10)
    bad = ids[5]
    corrupt(engine, bad, "status = 'bogus'")
    st = admin.outbox_status(engine)
    assert st["pending"] + st["dead"] + st["unknown_status"] == 10  # every row of the table is counted
    assert st["unknown_status"] == 1
    pub = MemoryPublisher()
    relay = Relay(engine, pub, config=cfg(ordering="none"))
    relay.drain()
    r = row(engine, bad)
    assert r.status == "dead"
    assert "unknown status 'bogus'" in r.last_error
    assert admin.outbox_status(engine)["unknown_status"] == 0
    assert admin.requeue_dead(engine, ids=[bad]) == 1
    relay.drain()
    relay.close()
    assert sorted(pub.published_ids) == sorted(ids)


def test_status_cli_shows_unknown_status_line(engine: sa.Engine, db_url: str, dialect_name: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from outbox.cli import main

    ids = write(engine, 3)
    corrupt(engine, ids[0], "status = 'bogus'")
    assert main(["status", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "unknown status: 1" in out


def quoted(dialect: str, column: str) -> str:
    return f"`{column}`" if dialect == "mariadb" else f'"{column}"'
