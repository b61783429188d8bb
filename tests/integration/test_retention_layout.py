"""The partitioned retention layout on PostgreSQL (``outbox db upgrade --layout partitioned``).

Each test migrates an empty database of its own. Checked: both layouts up and down with every row
kept, dedup across a partition boundary with two concurrent sessions (exactly one wins), no tuple
written for a duplicate, purge dropping the expired partitions and never a live one, partitions
created ahead (by ``outbox db partitions`` and by the relay at start), and the relay's audit mode
moving published rows into the archive in the mark's own transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from consumers import purge_processed
from outbox import Outbox, OutgoingMessage, admin, migrations
from outbox.brokers.memory import MemoryPublisher
from outbox.cli import main
from outbox.config import RelayConfig
from outbox.dialects import dialect_for
from outbox.dialects.pg_partitions import PartitionNames, drop_expired, maintain
from outbox.relay import Relay
from outbox.retention import purge_published
from outbox.schema import default_tables

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)

T = default_tables()
N = PartitionNames.of(T.names)
UTC = dt.timezone.utc
TODAY = dt.datetime.now(UTC).date()


def _midday(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(12), UTC)


@pytest.fixture
def parted(fresh_database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(fresh_database)
    migrations.upgrade(engine, layout="partitioned")
    yield engine
    engine.dispose()


def _relkind(engine: sa.Engine, name: str) -> str | None:
    with engine.connect() as c:
        return c.execute(sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": name}).scalar()


def _scalar(engine: sa.Engine, sql: str, **params: object) -> object:
    with engine.connect() as c:
        return c.execute(sa.text(sql), params).scalar()


def _partitions(engine: sa.Engine, parent: str) -> set[str]:
    with engine.connect() as c:
        return set(c.execute(sa.text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                     "WHERE i.inhparent = to_regclass(:p)"), {"p": parent}).scalars())


def _outbox_row(status: str, published_at: dt.datetime | None) -> dict[str, object]:
    now = dt.datetime.now(UTC)
    return {"message_id": uuid.uuid4(), "topic": "t", "payload": b"x", "partition": 0, "created_at": now,
            "available_at": now, "status": status, "published_at": published_at}


def _set_bucket(engine: sa.Engine, day: dt.date) -> None:
    with engine.begin() as c:
        c.execute(sa.text(f"UPDATE {N.bucket} SET bucket = :d"), {"d": day})


def _insert(conn: sa.Connection, ids: list[str], consumer: str = "c") -> set[str]:
    now = dt.datetime.now(UTC)
    rows = [{"consumer": consumer, "message_id": i, "processed_at": now} for i in ids]
    return dialect_for(conn).insert_new_keys(conn, T.processed, rows, "message_id")


# ----------------------------------------------------------------------------- migration


def test_both_layouts_up_and_down_keep_every_row(fresh_database: str) -> None:
    engine = sa.create_engine(fresh_database)
    try:
        migrations.upgrade(engine)  # plain: 0005 changes nothing
        assert migrations.current(engine) == migrations.heads()[0] == "0006_byte_order_keys"
        assert _relkind(engine, T.processed.name) == "r" and _relkind(engine, N.archive) is None
        with engine.begin() as c:
            c.execute(T.processed.insert(), [{"consumer": "c", "message_id": f"m{i}", "processed_at":
                                              dt.datetime.now(UTC)} for i in range(3)])
            c.execute(T.outbox.insert(), [_outbox_row("published", dt.datetime.now(UTC)),
                                          _outbox_row("pending", None)])
        # switching: down to 0004, up again with the other layout
        migrations.downgrade(engine, "0004_attributes")
        migrations.upgrade(engine, layout="partitioned")
        assert _relkind(engine, T.processed.name) == "p" and _relkind(engine, N.archive) == "p"
        assert _scalar(engine, f"SELECT count(*) FROM {T.processed.name}") == 3
        assert _scalar(engine, f"SELECT count(*) FROM {N.archive} WHERE status = 'published'") == 1
        assert _scalar(engine, f"SELECT count(*) FROM {T.outbox.name}") == 1  # the pending row stays
        assert f"{T.processed.name}_p{TODAY:%Y%m%d}" in _partitions(engine, T.processed.name)
        assert migrations.rows_dropped_by_downgrade(engine, "base")[N.archive] == 1  # `db downgrade` asks first
        migrations.downgrade(engine, "0004_attributes")
        assert _relkind(engine, T.processed.name) == "r" and _relkind(engine, N.archive) is None
        assert _scalar(engine, f"SELECT count(*) FROM {T.processed.name}") == 3
        assert _scalar(engine, f"SELECT count(*) FROM {T.outbox.name}") == 2
        with engine.begin() as c:  # the plain table is whole again: its primary key refuses a duplicate
            assert _insert(c, ["m0", "new"]) == {"new"}
        migrations.upgrade(engine, layout="partitioned")
        migrations.downgrade(engine, "base")
        assert set(sa.inspect(engine).get_table_names()) <= {migrations.VERSION_TABLE}
    finally:
        engine.dispose()


def _key_collations(engine: sa.Engine, table: str) -> dict[str, str]:
    with engine.connect() as c:
        return dict(c.execute(sa.text(
            "SELECT a.attname, k.collname FROM pg_attribute a JOIN pg_collation k ON k.oid = a.attcollation "
            "WHERE a.attrelid = to_regclass(:t) AND a.attname IN ('consumer', 'message_id')"), {"t": table}).all())


def test_0006_byte_order_keys_on_the_partitioned_layout_reach_every_partition(parted: sa.Engine) -> None:
    """``outbox db upgrade --layout partitioned``: the parent and each day partition get ``COLLATE "C"``
    keys (the ALTER recurses); the downgrade to 0005 gives them the default back, rows kept."""
    parts = sorted(_partitions(parted, T.processed.name))
    assert parts
    with parted.begin() as c:
        assert _insert(c, ["b", "a", "\u00e9"]) == {"b", "a", "\u00e9"}
    for name in (T.processed.name, *parts):
        assert _key_collations(parted, name) == {"consumer": "C", "message_id": "C"}, name
    migrations.downgrade(parted, "0005_retention_layout")
    assert _relkind(parted, T.processed.name) == "p"
    for name in (T.processed.name, *parts):
        assert _key_collations(parted, name) == {"consumer": "default", "message_id": "default"}, name
    migrations.upgrade(parted)
    with parted.begin() as c:  # the duplicate found across the re-made keys, the new id inserted
        assert _insert(c, ["a", "c"]) == {"c"}
    assert _scalar(parted, f"SELECT count(*) FROM {T.processed.name}") == 4


def test_partitioned_layout_is_refused_off_postgresql(tmp_path, dialect_name: str) -> None:
    from outbox.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="needs PostgreSQL"):
        migrations.upgrade(f"sqlite:///{tmp_path / 'x.db'}", layout="partitioned")


# ----------------------------------------------------------------------------- dedup across partitions


def test_duplicate_in_an_older_partition_is_found_and_writes_no_tuple(parted: sa.Engine) -> None:
    yesterday = TODAY - dt.timedelta(days=1)
    maintain(parted, T, now=_midday(yesterday))
    _set_bucket(parted, yesterday)
    with parted.begin() as c:
        assert _insert(c, ["a", "b"]) == {"a", "b"}
    assert maintain(parted, T)["bucket"] == TODAY.isoformat()
    with parted.begin() as c:
        def inserted() -> int:  # this backend's tuples inserted into the partitions, not yet flushed to the stats
            return int(c.execute(sa.text("SELECT COALESCE(sum(n_tup_ins), 0) FROM pg_stat_xact_user_tables "
                                         "WHERE relname LIKE :p"), {"p": f"{T.processed.name}_p%"}).scalar())

        before = inserted()
        assert _insert(c, ["a", "b", "c"]) == {"c"}
        assert _insert(c, ["a", "c"]) == set()  # in the old partition, and in the current one
        assert inserted() - before == 1, "a duplicate wrote a tuple"
        assert _insert(c, ["a"], consumer="other") == {"a"}  # another consumer's ids are its own


def _advisory_waiters(engine: sa.Engine) -> int:
    return int(_scalar(engine, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))


def _await(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("first_commits", [True, False])
def test_two_sessions_across_the_boundary_exactly_one_wins(parted: sa.Engine, first_commits: bool) -> None:
    """A writes id x into yesterday's bucket and stays open; the bucket move to today waits for A;
    B, writing into today's bucket, waits behind the move. If A commits, B finds A's row; if A rolls
    back, B's insert is the one."""
    yesterday = TODAY - dt.timedelta(days=1)
    maintain(parted, T, now=_midday(yesterday))
    _set_bucket(parted, yesterday)
    results: dict[str, object] = {}
    a = parted.connect()
    a.begin()
    assert _insert(a, ["x"]) == {"x"}

    def move() -> None:
        results["move"] = maintain(parted, T)

    def b() -> None:
        with parted.begin() as c:
            results["b"] = _insert(c, ["x"])

    mover = threading.Thread(target=move)
    mover.start()
    _await(lambda: _advisory_waiters(parted) == 1, "the bucket move to wait for A")
    other = threading.Thread(target=b)
    other.start()
    _await(lambda: _advisory_waiters(parted) == 2, "B to wait behind the move")
    (a.commit if first_commits else a.rollback)()
    a.close()
    mover.join(30)
    other.join(30)
    assert results["move"]["bucket"] == TODAY.isoformat()
    assert results["b"] == (set() if first_commits else {"x"})
    assert _scalar(parted, f"SELECT count(*) FROM {T.processed.name} WHERE message_id = 'x'") == 1
    bucket = yesterday if first_commits else TODAY
    assert _scalar(parted, f"SELECT bucket FROM {T.processed.name} WHERE message_id = 'x'") == bucket


# ----------------------------------------------------------------------------- purge and upkeep


def test_partitions_created_ahead_by_the_cli_and_the_relay(parted: sa.Engine, capsys) -> None:
    later = TODAY + dt.timedelta(days=10)
    out = maintain(parted, T, now=_midday(later), ahead=1)
    assert sorted(out["created"]) == sorted(N.partition(p, d) for p in (N.archive, T.processed.name)
                                            for d in (later, later + dt.timedelta(days=1)))
    assert maintain(parted, T, now=_midday(later), ahead=1)["created"] == []  # nothing missing: nothing done
    # a partition missing ahead: the relay creates it at start
    ahead = N.partition(T.processed.name, TODAY + dt.timedelta(days=3))
    with parted.begin() as c:
        c.execute(sa.text(f"DROP TABLE {ahead}"))
    relay = Relay(parted, MemoryPublisher(), config=RelayConfig(progress_interval=0, lease_ttl=3.0))
    relay.start()
    relay.close()
    assert ahead in _partitions(parted, T.processed.name)
    url = parted.url.render_as_string(hide_password=False)
    assert main(["db", "partitions", "--db", url, "--ahead", "5", "--json"]) == 0
    assert N.partition(N.archive, TODAY + dt.timedelta(days=5)) in capsys.readouterr().out


def test_purge_drops_expired_partitions_and_never_a_live_one(parted: sa.Engine) -> None:
    old = TODAY - dt.timedelta(days=20)
    late = TODAY - dt.timedelta(days=18)
    maintain(parted, T, now=_midday(old), ahead=4)
    with parted.begin() as c:
        rows = [{"consumer": "c", "message_id": f"o{i}", "processed_at": _midday(old), "bucket": old}
                for i in range(5)]
        # an old bucket still written to recently (its move came late): it stays
        rows.append({"consumer": "c", "message_id": "late", "processed_at": dt.datetime.now(UTC), "bucket": late})
        rows.append({"consumer": "c", "message_id": "now", "processed_at": dt.datetime.now(UTC), "bucket": TODAY})
        c.execute(sa.text(f"INSERT INTO {T.processed.name} (consumer, message_id, processed_at, bucket) "
                          "VALUES (:consumer, :message_id, :processed_at, :bucket)"), rows)
    assert purge_processed(parted, older_than=dt.timedelta(days=14)) == 5
    left = _partitions(parted, T.processed.name)
    assert N.partition(T.processed.name, old) not in left
    assert N.partition(T.processed.name, old + dt.timedelta(days=1)) not in left  # empty and expired
    assert {N.partition(T.processed.name, d) for d in (late, TODAY, TODAY + dt.timedelta(days=3))} <= left
    assert _scalar(parted, f"SELECT count(*) FROM {T.processed.name}") == 2

    # the current bucket is never dropped, however old its rows (purge itself moves the bucket first)
    _set_bucket(parted, late)
    with parted.begin() as c:
        c.execute(sa.text(f"UPDATE {T.processed.name} SET processed_at = :t"), {"t": _midday(old)})
        c.execute(sa.text(f"DELETE FROM {T.processed.name} WHERE bucket > :d"), {"d": late})
    cutoff = dt.datetime.now(UTC) - dt.timedelta(days=14)
    assert drop_expired(parted, T, "processed", cutoff) == {"dropped": [], "rows": 0}
    assert N.partition(T.processed.name, late) in _partitions(parted, T.processed.name)

    with parted.begin() as c:
        c.execute(T.outbox.insert(), [_outbox_row("pending", None)])
        c.execute(sa.text(f"INSERT INTO {N.archive} (id, message_id, topic, payload, partition, created_at, "
                          "available_at, status, published_at) VALUES (:id, :m, 't', '\\x00', 0, now(), now(), "
                          "'published', :at)"),
                  [{"id": i, "m": uuid.uuid4(), "at": at} for i, at in enumerate(
                      [_midday(old)] * 3 + [_midday(TODAY - dt.timedelta(days=30))]  # the default partition
                      + [dt.datetime.now(UTC) - dt.timedelta(days=2), dt.datetime.now(UTC)], start=1)])
    assert purge_published(parted, older_than=dt.timedelta(days=7), batch_size=1) == 4
    assert N.partition(N.archive, old) not in _partitions(parted, N.archive)
    assert N.partition(N.archive, TODAY) in _partitions(parted, N.archive)
    assert _scalar(parted, f"SELECT count(*) FROM {N.archive}") == 2
    assert _scalar(parted, f"SELECT count(*) FROM {T.outbox.name}") == 1  # the pending row is untouched


def test_relay_audit_mode_moves_published_rows_to_the_archive(parted: sa.Engine) -> None:
    box = Outbox()
    with Session(parted) as s, s.begin():
        box.add_many(s, [OutgoingMessage("orders", {"seq": i}, key=f"k{i % 3}") for i in range(30)])
    pub = MemoryPublisher()
    relay = Relay(parted, pub, config=RelayConfig(delete_published=False, progress_interval=0, lease_ttl=3.0))
    assert relay.drain() == 30
    relay.close()
    by_key: dict[str, list[int]] = {}
    for m in pub.snapshot():
        by_key.setdefault(m.key, []).append(int(m.payload.split(b":")[1].strip(b" }")))
    assert by_key == {f"k{k}": list(range(k, 30, 3)) for k in range(3)}  # each key in writing order, none twice
    assert _scalar(parted, f"SELECT count(*) FROM {T.outbox.name}") == 0
    with parted.connect() as c:
        rows = c.execute(sa.text(f"SELECT id, status, published_at FROM {N.archive} ORDER BY id")).all()
    assert len(rows) == 30 and {r.status for r in rows} == {"published"} and all(r.published_at for r in rows)
    assert admin.outbox_status(parted)["pending"] == 0
    # published today: not purged by a 1-day window
    assert purge_published(parted, older_than=dt.timedelta(days=1)) == 0


def test_status_counts_the_archived_rows(parted: sa.Engine, capsys) -> None:
    """Published rows in audit mode leave the outbox table for the archive: ``outbox status`` counts them
    there (``published`` is every row kept after sending; ``archived`` those of them in the archive)."""
    box = Outbox()
    with Session(parted) as s, s.begin():
        box.add_many(s, [OutgoingMessage("orders", {"seq": i}, key=f"k{i % 3}") for i in range(12)])
    relay = Relay(parted, MemoryPublisher(), config=RelayConfig(delete_published=False, progress_interval=0,
                                                                lease_ttl=3.0))
    assert relay.drain() == 12
    relay.close()
    with Session(parted) as s, s.begin():  # two more, not sent
        box.add_many(s, [OutgoingMessage("orders", {"seq": i}) for i in range(2)])
    st = admin.outbox_status(parted)
    assert (st["layout"], st["published"], st["archived"], st["pending"]) == ("partitioned", 12, 12, 2)
    url = parted.url.render_as_string(hide_password=False)
    assert main(["status", "--db", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["layout"], out["published"], out["archived"], out["pending"]) == ("partitioned", 12, 12, 2)
    assert main(["status", "--db", url]) == 0
    assert f"published:      12  (kept in audit mode; 12 of them in {N.archive})" in capsys.readouterr().out
    assert (st["archived_estimate"], st["published_estimate"]) == (False, False)  # a small archive: exact


def test_status_estimates_a_big_archive_and_says_so(parted: sa.Engine, capsys) -> None:
    """``count(*)`` reads the whole archive (about 0.5 s a million rows): from ESTIMATE_ABOVE rows the
    status takes the planner's estimate, and says it is one (``~N`` and ``archived_estimate``)."""
    n = admin.ESTIMATE_ABOVE + 500
    with parted.begin() as c:
        c.execute(sa.text(f"INSERT INTO {N.archive} (id, message_id, topic, payload, partition, created_at, "
                          "available_at, status, published_at) SELECT i, gen_random_uuid(), 't', '\\x00', 0, now(), "
                          "now(), 'published', now() FROM generate_series(1, :n) i"), {"n": n})
    with parted.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text(f"ANALYZE {N.archive}"))
        c.execute(sa.text(f"INSERT INTO {N.archive} (id, message_id, topic, payload, partition, created_at, "
                          "available_at, status, published_at) VALUES (:n + 1, gen_random_uuid(), 't', '\\x00', 0, "
                          "now(), now(), 'published', now())"), {"n": n})  # not in the estimate yet
    st = admin.outbox_status(parted)
    assert (st["archived_estimate"], st["published_estimate"]) == (True, True)
    assert abs(st["archived"] - n) <= n // 10 and st["published"] == st["archived"], st["archived"]
    exact = admin.outbox_status(parted, estimate_above=None)
    assert (exact["archived"], exact["archived_estimate"], exact["published_estimate"]) == (n + 1, False, False)
    url = parted.url.render_as_string(hide_password=False)
    assert main(["status", "--db", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["archived_estimate"] is True and out["published_estimate"] is True
    assert main(["status", "--db", url]) == 0
    text = capsys.readouterr().out
    assert f"published:      ~{st['published']}  (kept in audit mode; ~{st['archived']} of them in {N.archive}; " \
           "the database's estimate, not an exact count)" in text, text


@pytest.mark.parametrize("what", ["processed", "published"])
def test_purge_frees_the_parent_before_the_drop_unlinks_the_files(parted: sa.Engine, what: str) -> None:
    """Dropping a partition's files is file-system work (hundreds of ms per GB, seconds on a busy disk) done
    at commit. The parent must not be locked meanwhile: dedup inserts (which read every partition)
    and the relay's archive trigger would wait for it. So when the ``DROP TABLE`` runs, its ``DETACH``
    has already committed, and a writer of the parent, with a short lock timeout, gets through."""
    old = TODAY - dt.timedelta(days=20)
    maintain(parted, T, now=_midday(old), ahead=0)
    parent = T.processed.name if what == "processed" else N.archive
    with parted.begin() as c:
        if what == "processed":
            c.execute(sa.text(f"INSERT INTO {parent} (consumer, message_id, processed_at, bucket) "
                              "VALUES ('c', 'old', :at, :d)"), {"at": _midday(old), "d": old})
        else:
            c.execute(sa.text(f"INSERT INTO {parent} (id, message_id, topic, payload, partition, created_at, "
                              "available_at, status, published_at) VALUES (1, :m, 't', '\\x00', 0, now(), now(), "
                              "'published', :at)"), {"m": uuid.uuid4(), "at": _midday(old)})
    other = sa.create_engine(parted.url)
    seen: list[str] = []

    def write_meanwhile(conn, cursor, statement, params, context, executemany) -> None:
        if not statement.lstrip().upper().startswith("DROP TABLE"):
            return
        try:
            with other.begin() as c:
                c.execute(sa.text("SET LOCAL lock_timeout = 300"))
                if what == "processed":
                    _insert(c, [f"new-{uuid.uuid4()}"])
                else:
                    c.execute(sa.text(f"INSERT INTO {parent} (id, message_id, topic, payload, partition, "
                                      "created_at, available_at, status, published_at) VALUES (2, :m, 't', "
                                      "'\\x00', 0, now(), now(), 'published', now())"), {"m": uuid.uuid4()})
            seen.append("written")
        except sa.exc.OperationalError as e:
            seen.append(f"blocked: {e.orig}")

    sa.event.listen(parted, "before_cursor_execute", write_meanwhile)
    try:
        if what == "processed":
            assert purge_processed(parted, older_than=dt.timedelta(days=14)) == 1
        else:
            assert purge_published(parted, older_than=dt.timedelta(days=14)) == 1
    finally:
        sa.event.remove(parted, "before_cursor_execute", write_meanwhile)
        other.dispose()
    assert seen == ["written"]
    assert N.partition(parent, old) not in _partitions(parted, parent)
    # nothing of the dropped partition is left behind, attached or not
    assert _scalar(parted, "SELECT count(*) FROM pg_class WHERE relname LIKE :p AND relkind = 'r'",
                   p=f"{parent}\\_%{old:%Y%m%d}") == 0


def test_a_partition_left_detached_by_a_stopped_purge_is_dropped_by_the_next(parted: sa.Engine) -> None:
    old = TODAY - dt.timedelta(days=20)
    maintain(parted, T, now=_midday(old), ahead=0)
    name = N.partition(T.processed.name, old)
    doomed = f"{T.processed.name}_d{old:%Y%m%d}"
    with parted.begin() as c:  # what the first of drop_expired's two transactions leaves
        c.execute(sa.text(f"ALTER TABLE {T.processed.name} DETACH PARTITION {name}"))
        c.execute(sa.text(f"ALTER TABLE {name} RENAME TO {doomed}"))
        c.execute(sa.text(f"CREATE TABLE {T.processed.name}_d2026 (x int)"))  # not one of ours: kept
    assert _relkind(parted, doomed) == "r"
    assert purge_processed(parted, older_than=dt.timedelta(days=14)) == 0
    assert _relkind(parted, doomed) is None
    assert _relkind(parted, f"{T.processed.name}_d2026") == "r"
