"""Scenario 4 (P4): what the writer costs, against the physical floor of one more row.

Every variant is a one-row business transaction (ORM ``Session``: add an order, commit) and they
run in alternating blocks of ``--block`` transactions (the order rotates every block), ``--rounds``
times; each figure is the median over the rounds and each ratio the median of the per-round ratios:

- ``bare``: the business transaction alone;
- ``plain``: the same transaction plus one plain ORM row of the same size in a similar table (the
  outbox table's columns, indexes and values, with SQLAlchemy's stock types): the floor;
- ``add``: the same transaction plus ``Outbox.add`` of one message (same topic, key and payload).

Target: add / plain <= 1.05. Also, on the same database: ``add_many`` of 1,000 and 10,000 messages
per transaction against a raw ``session.execute(insert(outbox_table), rows)`` of the same rows (target
>= 0.9 x its rate), and on PostgreSQL also against a hand-written binary ``COPY`` of the same rows
(what ``add_many`` does there from 10 rows, so the tightest raw loop); the same three variants on
an ``AsyncSession``; and, on PostgreSQL when
``txoutbox`` and ``asyncpg`` are installed (``pip install -e '.[bench]'``), the peer's writer
(``PostgresStorage.insert`` in an asyncpg transaction) against the same transaction without it, in
the same alternation. ``--dbs`` adds SQLite and MariaDB runs (``writer_<db>_*`` lines).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import Outbox, migrations
from outbox.message import OutgoingMessage
from outbox.schema import DUE_NOW, STATUS_PENDING, default_tables

TOPIC = "orders"


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "bench_orders"
    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    customer: Mapped[str] = mapped_column(sa.String(64))
    amount: Mapped[int] = mapped_column(sa.Integer)
    note: Mapped[str] = mapped_column(sa.String(255))


class PlainRow(Base):
    """The outbox table's columns and indexes, stock SQLAlchemy types: what a hand-written row costs."""

    __tablename__ = "bench_plain_rows"
    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(sa.Uuid(), unique=True)
    topic: Mapped[str] = mapped_column(sa.String(249))
    key: Mapped[str | None] = mapped_column(sa.String(255))
    payload: Mapped[bytes] = mapped_column(sa.LargeBinary())
    headers: Mapped[Any] = mapped_column(sa.JSON(none_as_null=True), nullable=True)
    content_type: Mapped[str | None] = mapped_column(sa.String(127))
    partition: Mapped[int] = mapped_column(sa.SmallInteger())
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    available_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(sa.Integer())
    status: Mapped[str] = mapped_column(sa.String(16))
    attributes: Mapped[Any] = mapped_column(sa.JSON(none_as_null=True), nullable=True)
    __table_args__ = (sa.Index("ix_bench_plain_rows_claim", "partition", "status", "available_at", "id"),)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def plain_row(i: int, payload: bytes) -> PlainRow:
    key = f"c{i % 1000}"
    return PlainRow(message_id=uuid.uuid4(), topic=TOPIC, key=key, payload=payload, headers=None,
                    content_type="application/octet-stream", partition=zlib.crc32(key.encode()) % 32,
                    created_at=_now(), available_at=DUE_NOW, attempts=0, status=STATUS_PENDING, attributes=None)


def raw_rows(base: int, n: int, payload: bytes) -> list[dict[str, Any]]:
    """The rows ``add_many`` writes, as a hand-written ``executemany`` would build them."""
    now = _now()
    rows = []
    for j in range(base, base + n):
        key = f"k{j % 1000}"
        rows.append({"message_id": uuid.uuid4(), "topic": TOPIC, "key": key, "payload": payload,
                     "content_type": "application/octet-stream", "partition": zlib.crc32(key.encode()) % 32,
                     "created_at": now, "available_at": DUE_NOW, "attempts": 0, "status": STATUS_PENDING})
    return rows


# ------------------------------------------------------------------ timing
def _rotation(names: list[str], blocks: int) -> Iterator[str]:
    """The variants in the order they run: every block starts one further along the list."""
    for blk in range(blocks):
        yield from names[blk % len(names):] + names[:blk % len(names)]


def alternate(variants: dict[str, Callable[[int], None]], *, n: int, block: int, rounds: int,
              per: int = 1) -> dict[str, list[float]]:
    """Microseconds per call of each variant, one figure per round; blocks rotate the variants' order."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    i, blocks = 0, max(1, n // block)
    for _ in range(rounds):
        took = dict.fromkeys(variants, 0.0)
        for name in _rotation(list(variants), blocks):
            t0 = time.perf_counter()
            for _ in range(block):
                variants[name](i)
                i += per
            took[name] += time.perf_counter() - t0
        for k, v in took.items():
            out[k].append(v / (blocks * block) * 1e6)
    return out


async def alternate_async(variants: dict[str, Callable[[int], Awaitable[None]]], *, n: int, block: int,
                          rounds: int) -> dict[str, list[float]]:
    """:func:`alternate` for coroutines."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    i, blocks = 0, max(1, n // block)
    for _ in range(rounds):
        took = dict.fromkeys(variants, 0.0)
        for name in _rotation(list(variants), blocks):
            t0 = time.perf_counter()
            for _ in range(block):
                await variants[name](i)
                i += 1
            took[name] += time.perf_counter() - t0
        for k, v in took.items():
            out[k].append(v / (blocks * block) * 1e6)
    return out


def med(values: list[float]) -> float:
    return statistics.median(values)


def med_ratio(a: list[float], c: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, c, strict=True))


# ------------------------------------------------------------------ databases
@contextmanager
def database(db: str) -> Iterator[sa.Engine]:
    if db != "sqlite":
        with b.bench_database(db) as engine:
            yield engine
        return
    with tempfile.TemporaryDirectory() as d:
        engine = sa.create_engine(f"sqlite:///{d}/bench.db")
        try:
            migrations.upgrade(engine)
            yield engine
        finally:
            engine.dispose()


def async_url(engine: sa.Engine) -> str | None:
    url = engine.url
    if url.get_backend_name() == "postgresql":
        return url.set(drivername="postgresql+psycopg_async").render_as_string(hide_password=False)
    return None


def count(engine: sa.Engine, table: sa.Table | str) -> int:
    t = sa.table(table) if isinstance(table, str) else table
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())


# ------------------------------------------------------------------ scenarios
def single_row(engine: sa.Engine, outbox: Outbox, payload: bytes, args: Any, prefix: str) -> None:
    def bare(i: int) -> None:
        with Session(engine) as s, s.begin():
            s.add(Order(customer=f"c{i % 1000}", amount=i, note="benchmark order"))

    def plain(i: int) -> None:
        with Session(engine) as s, s.begin():
            s.add(Order(customer=f"c{i % 1000}", amount=i, note="benchmark order"))
            s.add(plain_row(i, payload))

    def add(i: int) -> None:
        with Session(engine) as s, s.begin():
            s.add(Order(customer=f"c{i % 1000}", amount=i, note="benchmark order"))
            outbox.add(s, TOPIC, payload, key=f"c{i % 1000}")

    variants: dict[str, Callable[[int], None]] = {"bare": bare, "plain": plain, "add": add}
    if engine.dialect.name == "postgresql":  # the wake-up a relay with --notify listens for
        notifying = Outbox(notify=True)

        def add_notify(i: int) -> None:
            with Session(engine) as s, s.begin():
                s.add(Order(customer=f"c{i % 1000}", amount=i, note="benchmark order"))
                notifying.add(s, TOPIC, payload, key=f"c{i % 1000}")

        variants["add_notify"] = add_notify
    alternate(variants, n=300, block=50, rounds=1)  # warm up: pool, statement caches
    before = count(engine, default_tables().outbox)
    res = alternate(variants, n=args.n, block=args.block, rounds=args.rounds)
    written = count(engine, default_tables().outbox) - before
    expected = max(1, args.n // args.block) * args.block * args.rounds
    rows = expected * (len(variants) - 2)  # add and add_notify write one outbox row per transaction
    if written != rows:
        raise SystemExit(f"{written} outbox rows written, expected {rows}")
    b.emit(f"{prefix}transactions_each", expected)
    b.emit(f"{prefix}bare_us_per_tx", med(res["bare"]))
    b.emit(f"{prefix}plain_row_us_per_tx", med(res["plain"]))
    b.emit(f"{prefix}add_us_per_tx", med(res["add"]))
    b.emit(f"{prefix}add_vs_plain_row_ratio", med_ratio(res["add"], res["plain"]))
    b.emit(f"{prefix}add_vs_bare_ratio", med_ratio(res["add"], res["bare"]))
    b.emit(f"{prefix}plain_row_vs_bare_ratio", med_ratio(res["plain"], res["bare"]))
    b.emit(f"{prefix}add_minus_plain_row_us", med(res["add"]) - med(res["plain"]))
    if "add_notify" in res:
        b.emit(f"{prefix}add_notify_us_per_tx", med(res["add_notify"]))
        b.emit(f"{prefix}add_notify_vs_add_ratio", med_ratio(res["add_notify"], res["add"]))
        b.emit(f"{prefix}add_notify_vs_plain_row_ratio", med_ratio(res["add_notify"], res["plain"]))


def many_rows(engine: sa.Engine, outbox: Outbox, payload: bytes, args: Any, prefix: str, size: int,
              txs: int) -> None:
    table = outbox.tables.outbox
    stmt = sa.insert(table)

    def raw(i: int) -> None:
        with Session(engine) as s, s.begin():
            s.execute(stmt, raw_rows(i, size, payload))

    def add_many(i: int) -> None:
        msgs = [OutgoingMessage(TOPIC, payload, key=f"k{j % 1000}") for j in range(i, i + size)]
        with Session(engine) as s, s.begin():
            outbox.add_many(s, msgs)

    variants = {"raw": raw, "add_many": add_many}
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
        columns = [c for c in raw_rows(0, 1, payload)[0]]
        types = {"message_id": "uuid", "payload": "bytea", "partition": "int2", "created_at": "timestamptz",
                 "available_at": "timestamptz", "attempts": "int4"}
        copy_sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"

        def raw_copy(i: int) -> None:
            rows = raw_rows(i, size, payload)
            with Session(engine) as s, s.begin():
                with s.connection().connection.dbapi_connection.cursor() as cur:  # type: ignore[union-attr]
                    with cur.copy(copy_sql) as cp:
                        cp.set_types([types.get(c, "varchar") for c in columns])
                        for r in rows:
                            cp.write_row([r[c] for c in columns])

        variants["raw_copy"] = raw_copy
    alternate(variants, n=2, block=1, rounds=1, per=size)
    res = alternate(variants, n=txs, block=1, rounds=args.rounds, per=size)
    cpu = {}  # this process's CPU per row (best of 3): what the client adds, whatever the load elsewhere
    for name, fn in variants.items():
        best = float("inf")
        for k in range(3):
            t0 = time.process_time()
            fn(10_000_000 + k * size)
            best = min(best, time.process_time() - t0)
        cpu[name] = best / size * 1e6
    b.emit(f"{prefix}add_many_{size}_client_cpu_us_per_row", cpu["add_many"])
    b.emit(f"{prefix}raw_executemany_{size}_client_cpu_us_per_row", cpu["raw"])
    raw_rate = med([size / (us / 1e6) for us in res["raw"]])
    ours_rate = med([size / (us / 1e6) for us in res["add_many"]])
    b.emit(f"{prefix}add_many_{size}_rows_per_s", ours_rate)
    b.emit(f"{prefix}raw_executemany_{size}_rows_per_s", raw_rate)
    b.emit(f"{prefix}add_many_{size}_vs_raw_executemany_ratio", 1 / med_ratio(res["add_many"], res["raw"]))
    if "raw_copy" in res:
        b.emit(f"{prefix}raw_copy_{size}_client_cpu_us_per_row", cpu["raw_copy"])
        b.emit(f"{prefix}raw_copy_{size}_rows_per_s", med([size / (us / 1e6) for us in res["raw_copy"]]))
        b.emit(f"{prefix}add_many_{size}_vs_raw_copy_ratio", 1 / med_ratio(res["add_many"], res["raw_copy"]))


def async_rows(engine: sa.Engine, outbox: Outbox, payload: bytes, args: Any, prefix: str) -> None:
    url = async_url(engine)
    if url is None:
        return

    async def run() -> dict[str, list[float]]:
        aengine = create_async_engine(url, pool_size=5)
        try:
            async def bare(i: int) -> None:
                async with AsyncSession(aengine) as s, s.begin():
                    s.add(Order(customer=f"c{i % 1000}", amount=i, note="benchmark order"))

            async def plain(i: int) -> None:
                async with AsyncSession(aengine) as s, s.begin():
                    s.add(Order(customer=f"c{i % 1000}", amount=i, note="benchmark order"))
                    s.add(plain_row(i, payload))

            async def add(i: int) -> None:
                async with AsyncSession(aengine) as s, s.begin():
                    s.add(Order(customer=f"c{i % 1000}", amount=i, note="benchmark order"))
                    outbox.add(s, TOPIC, payload, key=f"c{i % 1000}")

            variants = {"bare": bare, "plain": plain, "add": add}
            await alternate_async(variants, n=300, block=50, rounds=1)
            return await alternate_async(variants, n=args.n, block=args.block, rounds=args.rounds)
        finally:
            await aengine.dispose()

    res = asyncio.run(run())
    b.emit(f"{prefix}async_bare_us_per_tx", med(res["bare"]))
    b.emit(f"{prefix}async_plain_row_us_per_tx", med(res["plain"]))
    b.emit(f"{prefix}async_add_us_per_tx", med(res["add"]))
    b.emit(f"{prefix}async_add_vs_plain_row_ratio", med_ratio(res["add"], res["plain"]))
    b.emit(f"{prefix}async_add_vs_bare_ratio", med_ratio(res["add"], res["bare"]))


def peer_txoutbox(engine: sa.Engine, payload: bytes, args: Any, prefix: str) -> None:
    """txoutbox's writer: its ``insert(conn, ...)`` in an asyncpg transaction, vs the transaction alone."""
    if engine.dialect.name != "postgresql":
        return
    try:
        import asyncpg
        from txoutbox.adapters.postgres import PostgresStorage
    except ImportError:
        b.note("txoutbox/asyncpg not installed (pip install -e '.[bench]'): peer comparison skipped")
        return
    url = engine.url
    dsn = f"postgresql://{url.username}@{url.host}:{url.port or 5432}/{url.database}"
    insert_order = "INSERT INTO bench_orders (customer, amount, note) VALUES ($1, $2, $3) RETURNING id"

    async def run() -> dict[str, list[float]]:
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
        try:
            storage = PostgresStorage(pool, table="bench_txoutbox")
            await storage.create_schema()

            async def bare(i: int) -> None:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.fetchval(insert_order, f"c{i % 1000}", i, "benchmark order")

            async def insert(i: int) -> None:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.fetchval(insert_order, f"c{i % 1000}", i, "benchmark order")
                    await storage.insert(conn, TOPIC, payload, key=f"c{i % 1000}")

            variants = {"bare": bare, "insert": insert}
            await alternate_async(variants, n=300, block=50, rounds=1)
            return await alternate_async(variants, n=args.n, block=args.block, rounds=args.rounds)
        finally:
            await pool.close()

    res = asyncio.run(run())
    b.emit(f"{prefix}txoutbox_bare_us_per_tx", med(res["bare"]))
    b.emit(f"{prefix}txoutbox_insert_us_per_tx", med(res["insert"]))
    b.emit(f"{prefix}txoutbox_insert_vs_bare_ratio", med_ratio(res["insert"], res["bare"]))


def run_db(db: str, args: Any, prefix: str) -> None:
    outbox = Outbox()
    payload = b.payload_bytes(0)
    with database(db) as engine:
        Base.metadata.create_all(engine)
        parts = args.parts.split(",")
        if "single" in parts:
            b.note(f"{db}: one-row transactions")
            single_row(engine, outbox, payload, args, prefix)
        if "peer" in parts and db != "sqlite":
            b.note(f"{db}: txoutbox")
            peer_txoutbox(engine, payload, args, prefix)
        if "async" in parts and db != "sqlite":
            b.note(f"{db}: async")
            async_rows(engine, outbox, payload, args, prefix)
        if "many" in parts:
            b.note(f"{db}: add_many")
            many_rows(engine, outbox, payload, args, prefix, 1000, args.many_txs)
            many_rows(engine, outbox, payload, args, prefix, 10_000, max(2, args.many_txs // 10))


def main() -> None:
    p = b.parser(__doc__ or "", n=2000, many_txs=20)
    p.add_argument("--block", type=int, default=50, help="transactions per alternating block")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians over them")
    p.add_argument("--parts", default="single,peer,async,many", help="which measures: single,peer,async,many")
    p.add_argument("--dbs", default="sqlite", help="more databases to run after --db: sqlite,mariadb,postgresql")
    args = b.parse(p)
    b.emit("writer_db", args.db)
    run_db(args.db, args, "writer_")
    for db in [d for d in args.dbs.split(",") if d and d != args.db]:
        run_db(db, args, f"writer_{db}_")


if __name__ == "__main__":
    main()
