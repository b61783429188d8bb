"""Scenario P7: retention. Purge ``--rows`` (1,000,000) published outbox rows (audit mode) and as many
processed-message (dedup) rows, all older than the window.

PostgreSQL, same run, alternating, ``--runs`` (3) times, medians: today's batched DELETE (the plain
layout, short transactions over primary-key ranges) against the partitioned layout
(``outbox db upgrade --layout partitioned``), where ``outbox purge`` drops whole day partitions.
Reported for each: seconds, dead tuples left (``n_dead_tup``, autovacuum off on the tables so
that it is what the purge left, not what a vacuum later cleaned) and the table's size after
(``pg_total_relation_size``, every partition counted), with the ratio DELETE time / drop time.
Then the batched DELETE by primary-key range on SQLite (``--db postgresql``; the file's size) or MariaDB
(``--db mariadb``; the table's data + index length): seconds, rows/s, size before and after.

Rows are written server-side (``generate_series``, MariaDB's ``seq_1_to_N``, SQLite's recursive
CTE), 200-byte payloads, published / processed 30 days ago; the fill is not timed. On PostgreSQL
the fill is followed by ``VACUUM ANALYZE`` and ``CHECKPOINT`` on both layouts, so that the rows are
what 30-day-old rows are: hint bits set, statistics known, the pages written out. Without the
checkpoint (``--no-checkpoint``) the drop's commit truncates files whose pages the OS is still
writing back (it waits for that I/O), and the DELETE dirties pages no checkpoint has seen yet (no
full-page images in the WAL): neither is what a purge of old rows meets.

Last, on PostgreSQL, what the partitioned layout's archive trigger costs the relay in audit mode:
a drain of ``--audit-rows`` (100,000) to the no-op publisher on both layouts, ratio reported.

The DELETE leaves its dead tuples for a vacuum: ``VACUUM`` of the table right after, timed apart
(``retention_pg_*_delete_then_vacuum_s``), and the ratio (DELETE + VACUUM) / drop, the two ways to
the same end state (no dead tuple), as ``*_drop_vs_delete_and_vacuum_ratio``.

The drop's own cost is the file system's: its commit truncates the partition's files (PostgreSQL
unlinks them at the next checkpoint), freeing as many megabytes as the partition held. When the
server's data directory is on this machine, the same bytes are written to a file on its file system
(fsynced, as the checkpointed partition is) and truncated, then another file ``fdatasync``-ed (the
commit's WAL flush), medians of ``--runs``: ``retention_pg_*_fs_truncate_floor_s``, the floor no
drop can go under here, and ``*_delete_vs_fs_floor_ratio``, the largest speedup any drop could show.

Targets (PostgreSQL): drop >= 50 x faster than DELETE, 0 dead tuples, size back to near zero.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import sqlalchemy as sa

from consumers.retention import purge_processed
from outbox import migrations
from outbox.dialects.pg_partitions import PartitionNames, maintain
from outbox.retention import purge_published
from outbox.schema import default_tables

T = default_tables()
N = PartitionNames.of(T.names)
AGE = dt.timedelta(days=30)
WINDOW = dt.timedelta(days=14)
WHAT = ("published", "processed")


def _fill_pg(engine: sa.Engine, what: str, n: int, partitioned: bool, at: dt.datetime) -> None:
    with engine.begin() as c:
        if what == "published":
            target = N.archive if partitioned else T.outbox.name
            c.execute(sa.text(
                f"INSERT INTO {target} (id, message_id, topic, key, payload, partition, created_at, available_at, "
                "status, published_at) SELECT g, md5(g::text)::uuid, 'bench', 'k' || (g % 1000), "
                "decode(repeat('ab', 200), 'hex'), g % 16, :at, :at, 'published', :at FROM generate_series(1, :n) g"),
                {"at": at, "n": n})
        else:
            bucket, value = (", bucket", ", CAST(:day AS date)") if partitioned else ("", "")
            c.execute(sa.text(
                f"INSERT INTO {T.processed.name} (consumer, message_id, processed_at{bucket}) "
                f"SELECT 'bench.consumer', 'message-' || g, :at{value} FROM generate_series(1, :n) g"),
                {"at": at, "n": n, "day": at.date()})


def _relations(engine: sa.Engine, what: str, partitioned: bool) -> list[str]:
    parent = (N.archive if partitioned else T.outbox.name) if what == "published" else T.processed.name
    if not partitioned:
        return [parent]
    with engine.connect() as c:
        return list(c.execute(sa.text("SELECT relid::regclass::text FROM pg_partition_tree(CAST(:p AS regclass)) "
                                      "WHERE isleaf"), {"p": parent}).scalars())


def _dead_and_size(url: str, engine: sa.Engine, what: str, partitioned: bool) -> tuple[int, float]:
    """Dead tuples and total size (MB) of the table and every partition left, from a new backend."""
    engine.dispose()  # the purge's backends exit: their statistics are flushed
    fresh = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        rels = _relations(fresh, what, partitioned)
        dead, last = 0, None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until two reads agree (an exiting backend flushes on its way out)
            with fresh.connect() as c:
                dead = int(c.execute(sa.text("SELECT COALESCE(sum(n_dead_tup), 0) FROM pg_stat_user_tables "
                                             "WHERE relid::regclass::text = ANY(:r)"), {"r": rels}).scalar())
            if dead == last:
                break
            last = dead
            time.sleep(0.5)
        with fresh.connect() as c:
            size = int(c.execute(sa.text("SELECT COALESCE(sum(pg_total_relation_size(CAST(r AS regclass))), 0) "
                                         "FROM unnest(CAST(:r AS text[])) r"), {"r": rels}).scalar())
        return dead, size / 1e6
    finally:
        fresh.dispose()


def _purge(engine: sa.Engine, what: str, batch_size: int) -> int:
    if what == "published":
        return purge_published(engine, older_than=WINDOW, batch_size=batch_size)
    return purge_processed(engine, older_than=WINDOW, batch_size=batch_size)


def one_pg_run(rows: int, batch_size: int, partitioned: bool,
               checkpoint: bool = True) -> dict[str, tuple[float, ...]]:
    """what -> (seconds, dead tuples, size before MB, size after MB, VACUUM seconds, size after it MB) on a
    new database. The DELETE's dead tuples are then vacuumed (timed apart): the work still owed to
    reach the state a drop leaves (none for the drop)."""
    out = {}
    with b.bench_database("postgresql", migrate=False) as engine:
        url = b.url_of(engine)
        migrations.upgrade(engine, layout="partitioned" if partitioned else "plain")
        at = dt.datetime.now(dt.timezone.utc) - AGE
        if partitioned:
            maintain(engine, T, now=at, ahead=0)  # that day's partitions, as the relay made them back then
        for what in WHAT:
            for rel in _relations(engine, what, partitioned):
                with engine.begin() as c:
                    c.execute(sa.text(f"ALTER TABLE {rel} SET (autovacuum_enabled = false)"))
            _fill_pg(engine, what, rows, partitioned, at)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text("VACUUM ANALYZE"))
            if checkpoint:  # rows 30 days old are on disk, as they would be by then (see the docstring)
                c.execute(sa.text("CHECKPOINT"))
        if partitioned:
            maintain(engine, T)  # today's and the coming days' partitions, as the running relay keeps them
        for what in WHAT:
            before = _dead_and_size(url, engine, what, partitioned)[1]
            t0 = time.perf_counter()
            purged = _purge(engine, what, batch_size)
            seconds = time.perf_counter() - t0
            if purged != rows:
                raise SystemExit(f"{what}: purged {purged} of {rows} rows ({'drop' if partitioned else 'delete'})")
            dead, after = _dead_and_size(url, engine, what, partitioned)
            vacuum_s, vacuumed = 0.0, after
            if not partitioned:
                table = T.outbox.name if what == "published" else T.processed.name
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    t0 = time.perf_counter()
                    c.execute(sa.text(f"VACUUM {table}"))
                    vacuum_s = time.perf_counter() - t0
                vacuumed = _dead_and_size(url, engine, what, partitioned)[1]
            out[what] = (seconds, dead, before, after, vacuum_s, vacuumed)
    return out


def _local_data_directory(url: str) -> Path | None:
    """The server's data directory when it is on this machine (its parent on the same file system),
    else None (a note says why)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as c:
            data = Path(c.execute(sa.text("SHOW data_directory")).scalar_one())
    except sa.exc.DBAPIError:  # not a superuser nor in pg_read_all_settings: the path is not shown
        b.note("fs floor: the server does not show its data directory; not measured")
        return None
    finally:
        engine.dispose()
    try:
        if data.is_dir() and data.parent.stat().st_dev == data.stat().st_dev:
            return data
    except OSError:
        pass
    b.note(f"fs floor: the data directory {data} is not on this machine's file system here; not measured")
    return None


def _fs_truncate_floor(data: Path, mb: float, runs: int) -> float | None:
    """Seconds to truncate a fsynced file of ``mb`` megabytes beside the server's data directory
    ``data``, plus one ``fdatasync`` of another file: what a drop's commit does to the file system
    (median of ``runs``). None when nothing can be written there."""
    try:
        work = Path(tempfile.mkdtemp(prefix="bench-fs-floor-", dir=data.parent))
    except OSError as exc:
        b.note(f"fs floor: cannot write beside {data} ({exc.strerror}); not measured")
        return None
    chunk = os.urandom(1 << 20)
    times = []
    try:
        for _ in range(runs):
            big, small = work / "partition", work / "wal"
            with big.open("wb") as f:
                for _ in range(max(1, round(mb))):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            fd_small = os.open(small, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                t0 = time.perf_counter()
                fd = os.open(big, os.O_RDWR)
                os.ftruncate(fd, 0)
                os.close(fd)
                os.write(fd_small, b"x")
                os.fdatasync(fd_small)
                times.append(time.perf_counter() - t0)
            finally:
                os.close(fd_small)
            big.unlink()
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    return statistics.median(times)


def postgresql(args) -> None:
    runs: dict[bool, list[dict[str, tuple[float, ...]]]] = {False: [], True: []}
    for i in range(args.runs):
        for partitioned in ((False, True) if i % 2 == 0 else (True, False)):  # alternate who goes first
            b.note(f"run {i + 1}: {'partition drop' if partitioned else 'batched DELETE'}")
            runs[partitioned].append(one_pg_run(args.rows, args.purge_batch, partitioned, not args.no_checkpoint))
    b.emit("retention_pg_rows", args.rows)
    data = _local_data_directory(b.PG_URL)
    for what in WHAT:
        med: dict[bool, list[float]] = {}
        for partitioned, label in ((False, "delete"), (True, "drop")):
            cols = list(zip(*(r[what] for r in runs[partitioned]), strict=True))
            med[partitioned] = [statistics.median(c) for c in cols]
            s, dead, before, after, vacuum_s, vacuumed = med[partitioned]
            b.emit(f"retention_pg_{what}_{label}_s", s)
            b.emit(f"retention_pg_{what}_{label}_rows_per_s", args.rows / s)
            b.emit(f"retention_pg_{what}_{label}_dead_tuples", int(dead))
            b.emit(f"retention_pg_{what}_{label}_size_before_mb", before)
            b.emit(f"retention_pg_{what}_{label}_size_after_mb", after)
            if not partitioned:
                b.emit(f"retention_pg_{what}_delete_then_vacuum_s", vacuum_s)
                b.emit(f"retention_pg_{what}_delete_size_after_vacuum_mb", vacuumed)
        b.emit(f"retention_pg_{what}_drop_speedup_ratio", b.ratio(med[False][0], med[True][0]))
        floor = None if data is None else _fs_truncate_floor(data, med[True][2], args.runs)
        if floor is not None:
            b.emit(f"retention_pg_{what}_fs_truncate_floor_s", floor)
            b.emit(f"retention_pg_{what}_delete_vs_fs_floor_ratio", b.ratio(med[False][0], floor))
        # the same end state (no dead tuples): DELETE plus the VACUUM it leaves owed, against the drop
        b.emit(f"retention_pg_{what}_drop_vs_delete_and_vacuum_ratio",
               b.ratio(med[False][0] + med[False][4], med[True][0]))


def _batched_elsewhere(engine: sa.Engine, label: str, rows: int, batch_size: int,
                       fill: Callable[[sa.Connection, str, dt.datetime], None], size: Callable[[str], float]) -> None:
    at = dt.datetime.now(dt.timezone.utc) - AGE
    for what in WHAT:
        with engine.begin() as c:
            fill(c, what, at)
        before = size(what)
        t0 = time.perf_counter()
        purged = _purge(engine, what, batch_size)
        seconds = time.perf_counter() - t0
        if purged != rows:
            raise SystemExit(f"{label} {what}: purged {purged} of {rows} rows")
        b.emit(f"retention_{label}_{what}_delete_s", seconds)
        b.emit(f"retention_{label}_{what}_delete_rows_per_s", rows / seconds)
        b.emit(f"retention_{label}_{what}_size_before_mb", before)
        b.emit(f"retention_{label}_{what}_size_after_mb", size(what))


def sqlite(args) -> None:
    path = Path(tempfile.mkdtemp()) / "retention.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    migrations.upgrade(engine)
    seq = "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < :n) "

    def fill(c: sa.Connection, what: str, at: dt.datetime) -> None:
        ts = at.strftime("%Y-%m-%d %H:%M:%S.%f")
        if what == "published":
            c.execute(sa.text(seq + f"INSERT INTO {T.outbox.name} (message_id, topic, key, payload, partition, "
                              "created_at, available_at, status, attempts, published_at) SELECT printf('%032x', i), "
                              "'bench', 'k' || (i % 1000), randomblob(200), i % 16, :at, :at, 'published', 0, :at "
                              "FROM g"), {"n": args.other_rows, "at": ts})
        else:
            c.execute(sa.text(seq + f"INSERT INTO {T.processed.name} (consumer, message_id, processed_at) "
                              "SELECT 'bench.consumer', 'message-' || i, :at FROM g"), {"n": args.other_rows, "at": ts})

    try:
        b.emit("retention_sqlite_rows", args.other_rows)
        _batched_elsewhere(engine, "sqlite", args.other_rows, args.purge_batch, fill,
                           lambda _what: path.stat().st_size / 1e6)
    finally:
        engine.dispose()


def mariadb(args) -> None:
    with b.bench_database("mariadb") as engine:
        def fill(c: sa.Connection, what: str, at: dt.datetime) -> None:
            n = int(args.other_rows)
            if what == "published":
                c.execute(sa.text(f"INSERT INTO {T.outbox.name} (message_id, topic, `key`, payload, `partition`, "
                                  "created_at, available_at, status, attempts, published_at) SELECT "
                                  "UNHEX(MD5(seq)), 'bench', CONCAT('k', seq % 1000), REPEAT('x', 200), seq % 16, :at, "
                                  f"  :at, 'published', 0, :at FROM seq_1_to_{n}"), {"at": at})
            else:
                c.execute(sa.text(f"INSERT INTO {T.processed.name} (consumer, message_id, processed_at) SELECT "
                                  f"'bench.consumer', CONCAT('message-', seq), :at FROM seq_1_to_{n}"), {"at": at})

        def size(what: str) -> float:
            table = T.outbox.name if what == "published" else T.processed.name
            with engine.connect() as c:
                c.execute(sa.text(f"ANALYZE TABLE {table}")).all()
                return float(c.execute(sa.text(
                    "SELECT data_length + index_length FROM information_schema.TABLES WHERE table_schema = "
                    "DATABASE() AND table_name = :t"), {"t": table}).scalar()) / 1e6

        b.emit("retention_mariadb_rows", args.other_rows)
        _batched_elsewhere(engine, "mariadb", args.other_rows, args.purge_batch, fill, size)


def audit_relay(args) -> None:
    """What the archive trigger costs the relay in audit mode: drain ``--audit-rows`` to the no-op
    publisher with ``delete_published=False`` on both layouts, alternating, medians of ``--runs``."""
    from outbox.config import RelayConfig
    from outbox.relay import Relay

    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.runs):
        for partitioned in ((False, True) if i % 2 == 0 else (True, False)):
            with b.bench_database("postgresql", migrate=False) as engine:
                migrations.upgrade(engine, layout="partitioned" if partitioned else "plain")
                b.fill_backlog(engine, args.audit_rows, method="server")
                relay = Relay(engine, b.NullPublisher(), config=RelayConfig(
                    delete_published=False, batch_size=args.batch_size, progress_interval=0))
                t0 = time.perf_counter()
                done = relay.drain()
                rates[partitioned].append(done / (time.perf_counter() - t0))
                relay.close()
                if done != args.audit_rows:
                    raise SystemExit(f"audit drain published {done} of {args.audit_rows}")
    plain, parted = (statistics.median(rates[p]) for p in (False, True))
    b.emit("retention_pg_audit_relay_rows", args.audit_rows)
    b.emit("retention_pg_audit_relay_plain_msgs_per_s", plain)
    b.emit("retention_pg_audit_relay_partitioned_msgs_per_s", parted)
    b.emit("retention_pg_audit_relay_partitioned_vs_plain_ratio", b.ratio(parted, plain))


def main() -> None:
    p = b.parser(__doc__ or "", rows=1_000_000, other_rows=200_000, audit_rows=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--purge-batch", type=int, default=5000, help="rows per purge transaction (the CLI's default)")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="purge right after the fill, its pages still dirty in the OS cache (no CHECKPOINT first)")
    p.add_argument("--only", choices=("purge", "audit"), help="only the purge figures, or only the audit relay's")
    args = b.parse(p)
    if args.db == "postgresql":
        if args.only != "audit":
            postgresql(args)
            sqlite(args)
        if args.only != "purge":
            audit_relay(args)
    else:
        mariadb(args)


if __name__ == "__main__":
    main()
