"""The toolkit's own Alembic migrations on SQLite, PostgreSQL and MariaDB.

Every test gets an empty database of its own (``fresh_database``). Checked here: upgrade / current /
downgrade / upgrade again, no drift between the migration and ``outbox/schema.py`` (autogenerate
compare), renamed tables, the offline DDL really creating the schema, the ``outbox db`` CLI through
the installed console script, and the two ways of combining the toolkit with an application's own
Alembic project (the code in ``docs/migrations.md`` is the code these tests run).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from alembic import command
from outbox import migrations
from outbox.dialects import dialect_for
from outbox.schema import OutboxTables, TableNames, default_tables
from outbox.types import ExactString

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "migrations.md"
HEAD = "0006_byte_order_keys"
LAYOUT = "0005_retention_layout"
EXACT = "0003_exact_ids"
PREVIOUS = "0002_relay_groups"
FIRST = "0001_initial"
CUSTOM = TableNames(
    outbox="shop_outbox", processed="shop_processed", stages="shop_stages",
    dead_letters="shop_dead_letters", leases="shop_leases", relays="shop_relays",
)


# ----------------------------------------------------------------------------- helpers


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def _table_names(engine: sa.Engine, schema: str | None = None) -> set[str]:
    return set(sa.inspect(engine).get_table_names(schema=schema))


def _diff(engine: sa.Engine, tables: OutboxTables) -> list[object]:
    """Autogenerate's differences between the database and these tables' metadata (types and defaults too).

    Other tables in the database (another set of toolkit tables) are left out of the comparison.
    """
    own = set(tables.names.all())
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={
            "compare_type": True,
            "compare_server_default": True,
            "version_table": migrations.version_table_for(tables),
            "version_table_schema": tables.names.schema,
            "include_name": lambda name, type_, parent: type_ != "table" or name in own,
        })
        return list(compare_metadata(ctx, tables.metadata))


def _exact_columns(tables: OutboxTables) -> set[tuple[str, str]]:
    """(table, column) of every column the models declare as an exact (byte-for-byte) string."""
    return {(t.name, c.name) for t in tables.all() for c in t.columns if isinstance(c.type, ExactString)}


def _collations(engine: sa.Engine, tables: OutboxTables) -> dict[tuple[str, str], str]:
    """MySQL/MariaDB: the collation the database really gives each of the toolkit's text columns."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT TABLE_NAME, COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND COLLATION_NAME IS NOT NULL"))
        own = set(tables.names.all())
        return {(t, c): coll for t, c, coll in rows if t in own}


def _assert_ids_exact(engine: sa.Engine, tables: OutboxTables) -> None:
    """Every exact column is binary NO PAD on MariaDB (no other text column is), and on every dialect
    ids differing only in case, trailing space or accent are distinct primary keys."""
    exact = _exact_columns(tables)
    assert {("outbox_processed_messages", "message_id"), ("outbox_messages", "key"),
            ("outbox_relay_leases", "relay_group")} <= {(t.replace(tables.names.outbox, "outbox_messages")
                                                        .replace(tables.names.processed, "outbox_processed_messages")
                                                        .replace(tables.names.leases, "outbox_relay_leases"), c)
                                                       for t, c in exact}
    if engine.dialect.name in ("mysql", "mariadb"):
        coll = _collations(engine, tables)
        assert {k: v for k, v in coll.items() if k in exact} == dict.fromkeys(exact, "utf8mb4_nopad_bin")
        assert all(v != "utf8mb4_nopad_bin" for k, v in coll.items() if k not in exact)  # hostname, status...
    now = dt.datetime.now(dt.timezone.utc)
    ids = ["ABC", "abc", "a", "a ", "e", "\u00e9"]
    with engine.begin() as conn:
        conn.execute(tables.processed.insert(), [{"consumer": "c", "message_id": i, "processed_at": now} for i in ids])
        got = conn.execute(sa.select(tables.processed.c.message_id).where(tables.processed.c.message_id == "abc"))
        assert got.scalars().all() == ["abc"]
        assert sorted(conn.execute(sa.select(tables.processed.c.message_id)).scalars()) == sorted(ids)
        conn.execute(tables.processed.delete())


def _cli() -> list[str]:
    exe = shutil.which("outbox", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return [exe] if exe else [sys.executable, "-m", "outbox"]


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def _split_script(sql: str) -> list[str]:
    """Statements of an offline script (statements end with ';' at the end of a line)."""
    stmts = [s.strip() for s in re.split(r";\s*\n", sql)]
    return [s for s in stmts if s and not all(ln.startswith("--") for ln in s.splitlines() if ln.strip())]


# ----------------------------------------------------------------------------- the migration itself


def test_upgrade_from_clean_creates_every_table_and_only_its_own_version_table(fresh_database: str) -> None:
    engine = _engine(fresh_database)
    try:
        assert migrations.current(engine) is None
        migrations.upgrade(engine)
        names = _table_names(engine)
        expected = {t.name for t in OutboxTables().all()}
        assert expected <= names
        assert migrations.VERSION_TABLE in names
        assert "alembic_version" not in names
        assert names == expected | {migrations.VERSION_TABLE}
        assert migrations.current(engine) == HEAD
        assert migrations.heads() == [HEAD]
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_every_toolkit_table_and_upgrade_works_again(fresh_database: str) -> None:
    engine = _engine(fresh_database)
    expected = {t.name for t in OutboxTables().all()}
    try:
        migrations.upgrade(engine)
        migrations.downgrade(engine, "base")
        names = _table_names(engine)
        assert not (expected & names), f"left behind: {expected & names}"
        assert names <= {migrations.VERSION_TABLE}  # Alembic keeps the (empty) version table
        assert migrations.current(engine) is None

        migrations.upgrade(engine, HEAD)
        assert expected <= _table_names(engine)
        assert migrations.current(engine) == HEAD
        # the tables are usable, not just present
        with engine.begin() as conn:
            conn.execute(sa.insert(default_tables().leases).values(partition=0, generation=1))
            assert conn.execute(sa.select(sa.func.count()).select_from(default_tables().leases)).scalar() == 1
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op(fresh_database: str) -> None:
    engine = _engine(fresh_database)
    try:
        migrations.upgrade(engine)
        migrations.upgrade(engine)
        assert migrations.current(engine) == HEAD
    finally:
        engine.dispose()


def test_upgrade_from_0001_keeps_rows_and_keys_leases_by_group(fresh_database: str) -> None:
    """0002: existing leases join the default group with their generation; relays keep their rows."""
    engine = _engine(fresh_database)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        migrations.upgrade(engine, FIRST)
        le0 = sa.table("outbox_relay_leases", sa.column("partition"), sa.column("owner"), sa.column("generation"))
        r0 = sa.table("outbox_relays", *(sa.column(c) for c in
                                         ("relay_id", "hostname", "pid", "started_at", "heartbeat_at", "expires_at")))
        with engine.begin() as conn:
            conn.execute(le0.insert(), [{"partition": p, "owner": "old", "generation": 7 + p} for p in range(3)])
            conn.execute(r0.insert().values(relay_id="old", hostname="h", pid=1, started_at=now, heartbeat_at=now,
                                            expires_at=now))
        migrations.upgrade(engine)
        assert migrations.current(engine) == HEAD
        t = default_tables()
        with engine.begin() as conn:
            leases = conn.execute(sa.select(t.leases.c.relay_group, t.leases.c.partition, t.leases.c.owner,
                                            t.leases.c.generation).order_by(t.leases.c.partition)).all()
            assert [tuple(x) for x in leases] == [("default", p, "old", 7 + p) for p in range(3)]
            relay = conn.execute(sa.select(t.relays)).one()._mapping
            assert relay["relay_id"] == "old" and relay["relay_group"] == "default" and relay["topics"] == "*"
            assert relay["instance"] is None and relay["broker_kind"] is None
            # another group leases the same partition numbers next to the default group's rows
            conn.execute(t.leases.insert().values(relay_group="rabbit", partition=0, generation=0))
        pk = sa.inspect(engine).get_pk_constraint("outbox_relay_leases")
        assert pk["constrained_columns"] == ["relay_group", "partition"]
        assert _diff(engine, default_tables()) == []

        migrations.downgrade(engine, FIRST)  # back: only the default group's leases fit one row per partition
        pk = sa.inspect(engine).get_pk_constraint("outbox_relay_leases")
        assert pk["constrained_columns"] == ["partition"]
        with engine.connect() as conn:
            assert [tuple(x) for x in conn.execute(sa.select(le0.c.partition, le0.c.generation)
                                                   .order_by(le0.c.partition))] == [(p, 7 + p) for p in range(3)]
            assert conn.execute(sa.select(sa.func.count()).select_from(r0)).scalar_one() == 1
        migrations.upgrade(engine)
        assert migrations.current(engine) == HEAD
    finally:
        engine.dispose()


def test_cli_upgrade_from_0002_keeps_rows_and_makes_ids_exact(fresh_database: str, tmp_path: Path) -> None:
    """0003: `outbox db upgrade` turns the id/key columns binary NO PAD on MariaDB and keeps every row;
    the downgrade refuses while rows differ only in case, then goes back to the table default."""
    engine = _engine(fresh_database)
    now = dt.datetime.now(dt.timezone.utc)
    t = default_tables()
    mysql = engine.dialect.name in ("mysql", "mariadb")
    try:
        migrations.upgrade(engine, PREVIOUS)
        if mysql:  # the loss being fixed: the columns fold case before 0003 (JSON columns are utf8mb4_bin)
            assert {v for k, v in _collations(engine, t).items() if k in _exact_columns(t)} == {"utf8mb4_general_ci"}
        with engine.begin() as conn:
            conn.execute(t.processed.insert(), [{"consumer": "c", "message_id": i, "processed_at": now}
                                                for i in ("ABC", "x")])
            conn.execute(t.stages.insert().values(consumer="c", message_id="ABC", stage="Ship", completed_at=now))
            conn.execute(t.leases.insert().values(relay_group="G", partition=0, owner="R1", generation=3))
            conn.execute(t.relays.insert().values(relay_id="R1", hostname="h", pid=1, started_at=now,
                                                  heartbeat_at=now, expires_at=now, relay_group="G"))
            conn.execute(t.outbox.insert().values(
                message_id=__import__("uuid").uuid4(), topic="T", key="K", payload=b"p", partition=0,
                created_at=now, available_at=now, status="dead"))
            conn.execute(t.dead_letters.insert().values(
                consumer="c", message_id="ABC", topic="T", key="K", payload=b"p", error="e", attempts=1,
                first_failed_at=now, last_failed_at=now))

        proc = _run_cli("db", "upgrade", "--db", fresh_database, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"{PREVIOUS} -> {HEAD}" in proc.stdout
        assert migrations.current(engine) == HEAD
        with engine.connect() as conn:
            assert sorted(conn.execute(sa.select(t.processed.c.message_id)).scalars()) == ["ABC", "x"]
            assert conn.execute(sa.select(t.stages.c.stage)).scalar_one() == "Ship"
            lease = conn.execute(sa.select(t.leases.c.relay_group, t.leases.c.owner, t.leases.c.generation)).one()
            assert tuple(lease) == ("G", "R1", 3)
            assert conn.execute(sa.select(t.relays.c.relay_id, t.relays.c.relay_group)).one() == ("R1", "G")
            assert conn.execute(sa.select(t.outbox.c.topic, t.outbox.c.key)).one() == ("T", "K")
            assert conn.execute(sa.select(t.dead_letters.c.message_id)).scalar_one() == "ABC"
        assert _diff(engine, t) == []
        if mysql:
            assert {v for k, v in _collations(engine, t).items() if k in _exact_columns(t)} == {"utf8mb4_nopad_bin"}
        with engine.begin() as conn:  # now distinct from the rows already there
            conn.execute(t.processed.insert().values(consumer="c", message_id="abc", processed_at=now))
            conn.execute(t.leases.insert().values(relay_group="g", partition=0, generation=0))
        if not mysql:
            return

        proc = _run_cli("db", "downgrade", PREVIOUS, "--db", fresh_database, cwd=tmp_path)
        assert proc.returncode != 0
        assert "cannot downgrade below 0003_exact_ids" in proc.stderr, proc.stderr
        assert "outbox_processed_messages" in proc.stderr and "outbox_relay_leases" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert migrations.current(engine) == HEAD  # nothing was changed: refused before 0004 was undone
        assert "attributes" in {c["name"] for c in sa.inspect(engine).get_columns("outbox_messages")}
        assert {v for k, v in _collations(engine, t).items() if k in _exact_columns(t)} == {"utf8mb4_nopad_bin"}

        with engine.begin() as conn:
            conn.execute(t.processed.delete().where(t.processed.c.message_id == "abc"))
            conn.execute(t.leases.delete().where(t.leases.c.relay_group == "g"))
        migrations.downgrade(engine, PREVIOUS)
        assert migrations.current(engine) == PREVIOUS
        assert {v for k, v in _collations(engine, t).items() if k in _exact_columns(t)} == {"utf8mb4_general_ci"}
        with engine.connect() as conn:
            assert sorted(conn.execute(sa.select(t.processed.c.message_id)).scalars()) == ["ABC", "x"]
        cols = {c["name"]: c for c in sa.inspect(engine).get_columns("outbox_relay_leases")}
        assert cols["relay_group"]["comment"] and "'default'" in str(cols["relay_group"]["default"])
        assert cols["relay_group"]["nullable"] is False
    finally:
        engine.dispose()


def test_upgrade_from_0003_keeps_pending_rows_relayable_and_new_rows_carry_attributes(
        fresh_database: str, tmp_path: Path) -> None:
    """0004: rows written under 0003 relay unchanged (no attributes); the code at 0004 against a database at
    0003 says which column is missing and to run `outbox db upgrade`, from the writer and from the relay."""
    from sqlalchemy.orm import Session

    from outbox import Outbox, SchemaMissing
    from outbox.brokers.memory import MemoryPublisher
    from outbox.config import RelayConfig
    from outbox.relay import Relay

    engine = _engine(fresh_database)
    t = default_tables()
    now = dt.datetime.now(dt.timezone.utc)
    old_ids = [__import__("uuid").uuid4() for _ in range(3)]

    def relay_all() -> list:
        got: list = []
        relay = Relay(engine, MemoryPublisher(), on_published=got.extend,
                      config=RelayConfig(min_poll_interval=0.01, poll_interval=0.05, progress_interval=0))
        try:
            relay.drain()
        finally:
            relay.close()
        return got

    try:
        migrations.upgrade(engine, EXACT)
        with engine.begin() as conn:  # rows as the 0003 writer left them (no attributes column)
            conn.execute(t.outbox.insert(), [
                {"message_id": m, "topic": "orders", "key": "k", "payload": b'{"n": %d}' % i,
                 "headers": {"h": str(i)}, "content_type": "application/json", "partition": 0, "created_at": now,
                 "available_at": now, "status": "pending"} for i, m in enumerate(old_ids)])
        with pytest.raises(SchemaMissing) as err, Session(engine) as s, s.begin():
            Outbox().add(s, "orders", {}, type="t")
        assert "outbox_messages.attributes does not exist" in str(err.value)
        assert "0004_attributes" in str(err.value) and "run `outbox db upgrade" in str(err.value)
        with pytest.raises(SchemaMissing, match=r"outbox_messages\.attributes does not exist.*outbox db upgrade"):
            relay_all()
        proc = _run_cli("dead", "show", "1", "--db", fresh_database, cwd=tmp_path)  # any command reading the rows
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "column 'attributes' comes with 0004_attributes), run `outbox db upgrade" in proc.stderr, proc.stderr

        proc = _run_cli("db", "upgrade", "--db", fresh_database, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"{EXACT} -> {HEAD}" in proc.stdout, proc.stdout
        assert _diff(engine, t) == []
        with Session(engine) as s, s.begin():
            new = Outbox(source="/shop").add(s, "orders", {"n": 9}, key="k", type="order.placed")
        recs = relay_all()
        assert [r.message_id for r in recs] == [*old_ids, new]  # the old rows first, in order, unchanged
        assert [(r.payload, r.headers, dict(r.attributes)) for r in recs[:3]] == [
            (b'{"n": %d}' % i, {"h": str(i)}, {}) for i in range(3)]
        assert dict(recs[3].attributes) == {"type": "order.placed", "source": "/shop"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_exact_ids_on_a_latin1_database_and_back(dialect_name: str, fresh_database: str) -> None:
    """A database whose default is latin1: the id columns are utf8mb4 binary all the same, and the
    downgrade's collision check compares the values as latin1 would hold them."""
    from outbox.errors import DatabaseError

    engine = _engine(fresh_database)
    t = default_tables()
    now = dt.datetime.now(dt.timezone.utc)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER DATABASE CHARACTER SET latin1")
        migrations.upgrade(engine)
        coll = _collations(engine, t)
        exact = _exact_columns(t)
        assert {v for k, v in coll.items() if k in exact} == {"utf8mb4_nopad_bin"}
        assert coll[("outbox_messages", "content_type")] == "latin1_swedish_ci"
        with engine.begin() as conn:
            conn.execute(t.processed.insert(), [{"consumer": "c", "message_id": i, "processed_at": now}
                                                for i in ("\u00c9t\u00e9", "\u00e9t\u00e9", "x")])
        with pytest.raises(DatabaseError, match="cannot downgrade below 0003_exact_ids: outbox_processed_messages"):
            migrations.downgrade(engine, PREVIOUS)
        assert migrations.current(engine) == HEAD  # refused before any revision was undone
        with engine.begin() as conn:
            conn.execute(t.processed.delete().where(t.processed.c.message_id == "\u00e9t\u00e9"))
        migrations.downgrade(engine, PREVIOUS)
        assert {v for k, v in _collations(engine, t).items() if k in exact} == {"latin1_swedish_ci"}
        with engine.connect() as conn:
            assert sorted(conn.execute(sa.select(t.processed.c.message_id)).scalars()) == ["x", "\u00c9t\u00e9"]
    finally:
        engine.dispose()


def _key_collations(engine: sa.Engine, table: str) -> dict[str, str]:
    """PostgreSQL: the collation of the processed table's key columns (``default``: the database's)."""
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT a.attname, c.collname FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation "
            "WHERE a.attrelid = to_regclass(:t) AND a.attname IN ('consumer', 'message_id')"), {"t": table}).all())


def _key_state(engine: sa.Engine, t: OutboxTables) -> object:
    """What 0006 may change: the key collations (PostgreSQL), every column's collation (MariaDB), the
    processed table's DDL (SQLite)."""
    if engine.dialect.name == "postgresql":
        return _key_collations(engine, t.processed.name)
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE name = :n"),
                                {"n": t.processed.name}).scalar_one()
    return _collations(engine, t)


def test_0006_makes_the_dedup_keys_sort_byte_for_byte_and_its_downgrade_undoes_it(fresh_database: str) -> None:
    """PostgreSQL: ``COLLATE "C"`` on (consumer, message_id), rows and the primary key kept; elsewhere
    the revision changes nothing (the keys already sort byte for byte)."""
    engine = _engine(fresh_database)
    t = default_tables()
    now = dt.datetime.now(dt.timezone.utc)
    ids = ["b", "B", "a", "a ", "\u00e9", "e", "z\u00e9", "\U0001f600"]
    pg = engine.dialect.name == "postgresql"
    try:
        migrations.upgrade(engine, LAYOUT)
        before = _key_state(engine, t)
        with engine.begin() as conn:
            conn.execute(t.processed.insert(), [{"consumer": "c", "message_id": i, "processed_at": now} for i in ids])
        migrations.upgrade(engine)
        assert migrations.current(engine) == HEAD
        if pg:
            assert before == {"consumer": "default", "message_id": "default"}
            assert _key_state(engine, t) == {"consumer": "C", "message_id": "C"}
            assert _key_collations(engine, t.processed.name) == {"consumer": "C", "message_id": "C"}
        else:
            assert _key_state(engine, t) == before  # a no-op (MariaDB: binary since 0003; SQLite: BINARY)
        with engine.connect() as conn:
            got = conn.execute(sa.select(t.processed.c.message_id).order_by(t.processed.c.message_id)).scalars()
            assert list(got) == sorted(ids)  # code point order: UTF-8 byte order
        with engine.begin() as conn:  # the primary key is whole: a duplicate is refused, a new id is not
            assert dialect_for(conn).insert_new_keys(
                conn, t.processed, [{"consumer": "c", "message_id": i, "processed_at": now} for i in ("a", "A")],
                "message_id") == {"A"}
        migrations.downgrade(engine, LAYOUT)
        assert migrations.current(engine) == LAYOUT
        if pg:
            assert _key_collations(engine, t.processed.name) == {"consumer": "default", "message_id": "default"}
        with engine.connect() as conn:
            assert sorted(conn.execute(sa.select(t.processed.c.message_id)).scalars()) == sorted([*ids, "A"])
        migrations.upgrade(engine)
        assert _diff(engine, t) == []
    finally:
        engine.dispose()


def test_no_drift_between_migration_and_schema(fresh_database: str) -> None:
    engine = _engine(fresh_database)
    try:
        migrations.upgrade(engine)
        assert _diff(engine, default_tables()) == []
        _assert_ids_exact(engine, default_tables())
        # and the comparison is not vacuous: a dropped index is reported
        (index,) = default_tables().processed.indexes
        with engine.begin() as conn:
            index.drop(conn)
        diff = _diff(engine, default_tables())
        assert [d[0] for d in diff] == ["add_index"]  # type: ignore[index]
    finally:
        engine.dispose()


def test_custom_table_names_migrate_without_drift_next_to_the_default_ones(fresh_database: str) -> None:
    engine = _engine(fresh_database)
    custom = OutboxTables(CUSTOM)
    try:
        migrations.upgrade(engine)  # the default set first, in the same schema
        migrations.upgrade(engine, tables=custom)
        names = _table_names(engine)
        assert set(CUSTOM.all()) <= names
        assert set(TableNames().all()) <= names
        assert migrations.version_table_for(custom) == "shop_outbox_alembic_version"
        assert {"shop_outbox_alembic_version", migrations.VERSION_TABLE} <= names
        assert migrations.current(engine, tables=custom) == HEAD
        assert _diff(engine, custom) == []
        _assert_ids_exact(engine, custom)
        with engine.connect() as conn:
            idx = {i["name"] for i in sa.inspect(conn).get_indexes("shop_outbox")}
        assert "ix_shop_outbox_claim" in idx

        migrations.downgrade(engine, "base", tables=custom)
        names = _table_names(engine)
        assert not (set(CUSTOM.all()) & names)
        assert set(TableNames().all()) <= names, "downgrading the renamed set must leave the default set alone"
        assert migrations.current(engine) == HEAD
    finally:
        engine.dispose()


@pytest.mark.parametrize("dialect_name", ["postgresql"])  # schemas inside one database
def test_postgresql_schema(dialect_name: str, fresh_database: str) -> None:
    engine = _engine(fresh_database)
    tables = OutboxTables(TableNames(schema="outboxkit"))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA outboxkit"))
        migrations.upgrade(engine, tables=tables)
        assert set(TableNames().all()) | {migrations.VERSION_TABLE} == _table_names(engine, "outboxkit")
        assert _table_names(engine) == set()
        assert migrations.current(engine, tables=tables) == HEAD
        assert migrations.current(engine) is None
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "compare_type": True, "compare_server_default": True, "include_schemas": True,
                "version_table": migrations.VERSION_TABLE, "version_table_schema": "outboxkit",
                "include_name": lambda name, type_, parent: type_ != "schema" or name == "outboxkit",
            })
            assert compare_metadata(ctx, tables.metadata) == []
    finally:
        engine.dispose()


def test_offline_sql_creates_the_same_schema(dialect_name: str, fresh_database: str) -> None:
    """The DBA path: the script from `outbox db sql`, run by hand, gives the same tables as `upgrade`."""
    offline_dialect = {"postgresql": "postgresql://", "mariadb": "mariadb://", "sqlite": "sqlite://"}[dialect_name]
    script = migrations.offline_sql(offline_dialect)
    assert "CREATE TABLE outbox_messages" in script
    assert "alembic_version (" not in script.replace("outbox_alembic_version (", "")
    engine = sa.create_engine(fresh_database, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for stmt in _split_script(script):
                conn.exec_driver_sql(stmt)
        assert migrations.current(engine) == HEAD
        assert _diff(engine, default_tables()) == []
        _assert_ids_exact(engine, default_tables())
        migrations.downgrade(engine, "base")  # and the online tools take over from there
        assert not (set(TableNames().all()) & _table_names(engine))
    finally:
        engine.dispose()


def test_offline_sql_from_a_revision_to_itself_is_empty_of_ddl() -> None:
    script = migrations.offline_sql("postgresql://", HEAD, from_revision=HEAD)
    assert "CREATE TABLE" not in script


# ----------------------------------------------------------------------------- the CLI


def test_cli_upgrade_current_downgrade(fresh_database: str, tmp_path: Path) -> None:
    url = fresh_database
    proc = _run_cli("db", "current", "--db", url, cwd=tmp_path)
    if url.startswith("sqlite"):  # a missing SQLite file is an error, only `db upgrade` creates it
        assert proc.returncode == 2 and "no such database file" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert "none (run `outbox db upgrade`)" in proc.stdout

    proc = _run_cli("db", "upgrade", "--db", url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"none -> {HEAD}" in proc.stdout

    proc = _run_cli("db", "current", "--db", url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"revision:\s+{HEAD} \(head\)", proc.stdout), proc.stdout

    proc = _run_cli("db", "current", "--json", "--check", "--db", url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["revision"] == HEAD and data["is_head"] is True and data["heads"] == [HEAD]
    assert data["version_table"] == migrations.VERSION_TABLE

    engine = _engine(url)
    try:
        assert set(TableNames().all()) <= _table_names(engine)
        proc = _run_cli("db", "downgrade", "base", "--db", url, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"{HEAD} -> none" in proc.stdout
        assert not (set(TableNames().all()) & _table_names(engine))
    finally:
        engine.dispose()

    proc = _run_cli("db", "current", "--check", "--db", url, cwd=tmp_path)
    assert proc.returncode == 1
    assert "none (run `outbox db upgrade`)" in proc.stdout


def test_cli_table_prefix(fresh_database: str, tmp_path: Path) -> None:
    proc = _run_cli("db", "upgrade", "--db", fresh_database, "--table-prefix", "shop", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    engine = _engine(fresh_database)
    try:
        names = _table_names(engine)
        assert {"shop_messages", "shop_processed_messages", "shop_relay_leases"} <= names
        assert "outbox_messages" not in names
        assert "shop_messages_alembic_version" in names
    finally:
        engine.dispose()
    proc = _run_cli("db", "current", "--json", "--db", fresh_database, "--table-prefix", "shop", cwd=tmp_path)
    assert json.loads(proc.stdout)["revision"] == HEAD


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "mariadb", "sqlite"])
def test_cli_sql_prints_offline_ddl(dialect: str, tmp_path: Path) -> None:
    proc = _run_cli("db", "sql", "--dialect", dialect, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE outbox_messages" in proc.stdout
    assert "CREATE TABLE outbox_alembic_version" in proc.stdout
    assert f"INSERT INTO outbox_alembic_version (version_num) VALUES ('{FIRST}')" in proc.stdout
    assert f"UPDATE outbox_alembic_version SET version_num='{HEAD}'" in proc.stdout
    assert "Warning" not in proc.stderr
    assert "Traceback" not in proc.stderr
    if dialect == "postgresql":
        assert "payload BYTEA NOT NULL" in proc.stdout
        assert "headers JSONB" in proc.stdout


def test_cli_sql_with_a_url_never_connects_nor_shows_the_password(tmp_path: Path) -> None:
    proc = _run_cli("db", "sql", "--db", "postgresql+psycopg://u:topsecret@127.0.0.1:1/x", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE outbox_messages" in proc.stdout
    assert "topsecret" not in proc.stdout + proc.stderr


def test_cli_sql_needs_a_dialect(tmp_path: Path) -> None:
    proc = _run_cli("db", "sql", cwd=tmp_path)
    assert proc.returncode != 0
    assert "--dialect" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_heads(tmp_path: Path) -> None:
    proc = _run_cli("db", "heads", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{HEAD} (head)"


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://u:topsecret@127.0.0.1:1/x",
    "mysql+pymysql://u:topsecret@127.0.0.1:1/x",
])
@pytest.mark.parametrize("action", [["upgrade"], ["current"], ["downgrade", "base"]])
def test_cli_unreachable_database_is_one_clear_line_without_the_password(
    url: str, action: list[str], tmp_path: Path
) -> None:
    proc = _run_cli("db", *action, "--db", url, cwd=tmp_path)
    assert proc.returncode != 0
    assert "topsecret" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot connect to ")
    assert "u:***@127.0.0.1:1/x" in lines[0]


def test_cli_unknown_revision_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    proc = _run_cli("db", "upgrade", "no_such_rev", "--db", url, cwd=tmp_path)
    assert proc.returncode != 0
    assert "no_such_rev" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_without_database(tmp_path: Path) -> None:
    proc = _run_cli("db", "upgrade", cwd=tmp_path)
    assert proc.returncode != 0
    assert "--db" in proc.stderr and "OUTBOX_DB_URL" in proc.stderr


# ----------------------------------------------------------------------------- inside the application's Alembic

USER_ENV_PY = '''\
from alembic import context
from sqlalchemy import engine_from_config, pool

from app_models import metadata

config = context.config
target_metadata = metadata


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
'''

USER_MODELS_PY = '''\
import sqlalchemy as sa

metadata = sa.MetaData()
orders = sa.Table(
    "orders", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
)
'''

# docs/migrations.md shows this file verbatim (checked below)
USER_MIGRATION_PY = '''\
"""orders, and the outbox toolkit's tables

Revision ID: a1_orders
Revises:
"""
import sqlalchemy as sa
from alembic import op

from outbox.migrations import downgrade as outbox_downgrade
from outbox.migrations import upgrade as outbox_upgrade

revision = "a1_orders"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(20), nullable=False),
    )
    # the toolkit's tables, pinned to the revision this migration was written against;
    # they are recorded in outbox_alembic_version, your alembic_version stays yours
    outbox_upgrade(op.get_bind(), "0001_initial")
    op.create_index("ix_orders_status", "orders", ["status"])


def downgrade() -> None:
    outbox_downgrade(op.get_bind(), "base")
    op.drop_index("ix_orders_status", table_name="orders")
    op.drop_table("orders")
'''

# the autogenerate route: the application's metadata includes the toolkit's tables
USER_MODELS_WITH_OUTBOX_PY = '''\
import sqlalchemy as sa
from outbox import OutboxTables

metadata = sa.MetaData()
orders = sa.Table(
    "orders", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
)
outbox_tables = OutboxTables(metadata=metadata)  # the toolkit's tables, on your metadata
'''

USER_ENV_PY_WITH_OUTBOX_LIST = USER_ENV_PY.replace(
    "from app_models import metadata\n",
    "import outbox\nfrom app_models import metadata\n",
).replace(
    "target_metadata = metadata\n",
    "target_metadata = [metadata, outbox.default_tables().metadata]\n",
)

USER_SCRIPT_MAKO = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text  # autogenerate renders JSONB(astext_type=Text()) without a prefix
import outbox.types
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
'''


def _user_project(tmp_path: Path, url: str, *, env_py: str, models_py: str,
                  migration_py: str | None) -> Config:
    root = tmp_path / "app"
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(env_py)
    (root / "migrations" / "script.py.mako").write_text(USER_SCRIPT_MAKO)
    (root / "app_models.py").write_text(models_py)
    if migration_py is not None:
        (root / "migrations" / "versions" / "a1_orders.py").write_text(migration_py)
    (root / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s/migrations\nprepend_sys_path = %(here)s\npath_separator = os\n"
    )
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@pytest.fixture
def user_sys_path(tmp_path: Path):
    """`app_models` importable, as in the application's own project; forgotten afterwards."""
    sys.path.insert(0, str(tmp_path / "app"))
    yield
    sys.path.remove(str(tmp_path / "app"))
    sys.modules.pop("app_models", None)


def test_documented_code_is_the_tested_code() -> None:
    doc = DOCS.read_text()
    assert USER_MIGRATION_PY in doc
    text_import = "from sqlalchemy import Text  # autogenerate renders JSONB(astext_type=Text()) without a prefix\n"
    assert text_import in doc and text_import in USER_SCRIPT_MAKO
    assert "target_metadata = [metadata, outbox.default_tables().metadata]" in doc
    assert "outbox_tables = OutboxTables(metadata=metadata)  # the toolkit's tables, on your metadata" in doc


def test_alembic_user_calls_toolkit_migrations_from_their_own(
    fresh_database: str, tmp_path: Path, user_sys_path: None
) -> None:
    cfg = _user_project(tmp_path, fresh_database, env_py=USER_ENV_PY, models_py=USER_MODELS_PY,
                        migration_py=USER_MIGRATION_PY)
    command.upgrade(cfg, "head")
    engine = _engine(fresh_database)
    try:
        names = _table_names(engine)
        assert {"orders", "alembic_version"} <= names
        assert set(TableNames().all()) | {migrations.VERSION_TABLE} <= names
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == ["a1_orders"]
            assert {i["name"] for i in sa.inspect(conn).get_indexes("orders")} == {"ix_orders_status"}
        assert migrations.current(engine) == FIRST  # the revision the user's migration pinned
        migrations.upgrade(engine)  # what the user's next migration does to follow the toolkit
        assert _diff(engine, default_tables()) == []

        command.downgrade(cfg, "base")
        names = _table_names(engine)
        assert "orders" not in names
        assert not (set(TableNames().all()) & names)
        assert migrations.current(engine) is None
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 0

        command.upgrade(cfg, "head")  # and back again
        assert {"orders", *TableNames().all()} <= _table_names(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("form", ["metadata_list", "shared_metadata"])
def test_alembic_user_autogenerates_the_toolkit_tables(
    form: str, fresh_database: str, tmp_path: Path, user_sys_path: None
) -> None:
    if form == "metadata_list":
        env_py, models_py = USER_ENV_PY_WITH_OUTBOX_LIST, USER_MODELS_PY
    else:
        env_py, models_py = USER_ENV_PY, USER_MODELS_WITH_OUTBOX_PY
    cfg = _user_project(tmp_path, fresh_database, env_py=env_py, models_py=models_py, migration_py=None)
    script = command.revision(cfg, message="initial", autogenerate=True, rev_id="a1_initial")
    text = Path(script.path).read_text()  # type: ignore[union-attr]
    assert "op.create_table('outbox_messages'" in text
    assert "outbox.types.UTCDateTime(" in text

    command.upgrade(cfg, "head")
    engine = _engine(fresh_database)
    try:
        names = _table_names(engine)
        assert {"orders", "alembic_version", *TableNames().all()} <= names
        assert migrations.VERSION_TABLE not in names  # this way the application's migrations own the tables
    finally:
        engine.dispose()
    command.check(cfg)  # raises if autogenerate still sees a difference (type or default drift)
