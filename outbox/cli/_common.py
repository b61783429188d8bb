"""Helpers shared by the sub-commands: database options, engines, JSON output."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .._redact import mask_secrets
from ..errors import ConfigurationError, DatabaseError, SchemaMissing
from ..schema import OutboxTables, TableNames

log = logging.getLogger("outbox.cli")

DEFAULT_DB_ENV = "OUTBOX_DB_URL"


#: The young generation's collection threshold in a daemon's loop (CPython's default: 700). Counted as
#: objects allocated minus objects freed, so it bounds how many objects may be alive, not how many are made.
DAEMON_GC_THRESHOLD = 10_000


def settle_daemon_heap() -> None:
    """What ``outbox relay`` and ``outbox consume`` do once start-up is done, before their loop.

    - ``gc.freeze()``: what start-up made (modules, SQLAlchemy's compiled statements) lives as long
      as the process; frozen, it is left out of every later collection, whose full passes otherwise
      walked it all (a 30-35 ms pause of the publish loop, the top of the relay-added p99 latency).
    - The young generation is collected once :data:`DAEMON_GC_THRESHOLD` more objects are alive
      instead of 700. A batch's records stay alive until the batch ends, so at 700 each collection
      walked the batch built so far, and promoted it to be walked again by the older generations:
      1.3-2.3 us of collection a message to Kafka (100,000-row drains, ``gc.callbacks``), 0.02 at
      10,000, where the relay's 1,000-row batches run from start to end without a collection.
      Reference cycles wait a little longer for their collection; memory stays bounded by the threshold.

    A threshold the process already raised higher is kept.
    """
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, DAEMON_GC_THRESHOLD), gen1, gen2)


def add_db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get(DEFAULT_DB_ENV),
                   help=f"SQLAlchemy database URL (env {DEFAULT_DB_ENV})")
    p.add_argument("--table-prefix", default=os.environ.get("OUTBOX_TABLE_PREFIX"),
                   help="prefix of the toolkit's table names, default 'outbox' (env OUTBOX_TABLE_PREFIX)")
    p.add_argument("--schema", default=os.environ.get("OUTBOX_DB_SCHEMA"), help="database schema of the tables")


def require_db(args: argparse.Namespace) -> str:
    if not getattr(args, "db", None):
        raise ConfigurationError(f"no database given: pass --db URL or set {DEFAULT_DB_ENV}")
    return str(args.db)


def tables_from_args(args: argparse.Namespace) -> OutboxTables:
    prefix = getattr(args, "table_prefix", None)
    schema = getattr(args, "schema", None)
    if not prefix and not schema:
        from ..schema import default_tables

        return default_tables()
    names = TableNames(schema=schema) if not prefix else TableNames(
        outbox=f"{prefix}_messages", processed=f"{prefix}_processed_messages", stages=f"{prefix}_consumer_stages",
        dead_letters=f"{prefix}_dead_letters", leases=f"{prefix}_relay_leases", relays=f"{prefix}_relays",
        schema=schema,
    )
    return OutboxTables(names)


#: URL schemes without a driver -> (SQLAlchemy dialect, drivers to try in order, the extra to install)
_DEFAULT_DRIVERS = {
    "postgres": ("postgresql", ("psycopg", "psycopg2"), "postgresql"),
    "postgresql": ("postgresql", ("psycopg", "psycopg2"), "postgresql"),
    "mysql": ("mysql", ("pymysql", "mysqldb"), "mysql"),
    "mariadb": ("mariadb", ("pymysql", "mysqldb"), "mysql"),
}
_DRIVER_MODULES = {"psycopg": "psycopg", "psycopg2": "psycopg2", "pymysql": "pymysql", "mysqldb": "MySQLdb"}
_EXTRA_OF_BACKEND = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}


def masked_url(url: object) -> str:
    try:
        return sa.engine.make_url(str(url)).render_as_string(hide_password=True)
    except Exception:
        return mask_secrets(url)


def one_line(exc: BaseException) -> str:
    """The driver's message in one line, masked: no ``[SQL: ...]``, no background link."""
    inner = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("(Background on this error", "[SQL:", "[parameters:"))]
    return mask_secrets("; ".join(lines) or type(inner).__name__)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def database_url(url: str, *, create: bool = False, offline: bool = False) -> str:
    """Check ``--db`` and give it a driver: ``postgres://`` and ``postgresql://`` get psycopg 3 (or
    psycopg2), ``mysql://`` and ``mariadb://`` get PyMySQL, whichever is installed; a missing SQLite
    file is an error unless ``create``. ``offline`` (DDL only): only the dialect name is fixed."""
    try:
        u = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"--db {masked_url(url)!r} is not a database URL ({one_line(exc)}); use e.g. "
                                 "postgresql://user@host/db, mysql://user@host/db or sqlite:///file.db") from None
    backend, _, driver = u.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend in _DEFAULT_DRIVERS and not driver and not offline:
        dialect, candidates, extra = _DEFAULT_DRIVERS[backend]
        chosen = next((d for d in candidates if _installed(_DRIVER_MODULES[d])), None)
        if chosen is None:
            raise ConfigurationError(f"no {dialect} driver is installed for {masked_url(url)}: "
                                     f"pip install 'outboxkit[{extra}]'")
        log.info("database %s: using the %s driver (%s+%s)", masked_url(url), chosen, dialect, chosen)
        u = u.set(drivername=f"{dialect}+{chosen}")
    elif backend != u.drivername.partition("+")[0]:
        u = u.set(drivername=f"{backend}+{driver}" if driver else backend)
    if backend == "sqlite" and not create and not offline:
        db = u.database
        in_memory = not db or db == ":memory:" or str(u.query.get("mode", "")) == "memory"
        if not in_memory and not str(db).startswith("file:") and not Path(db).exists():
            raise ConfigurationError(f"no such database file: {Path(db).resolve()} (check --db; "
                                     "`outbox db upgrade --db URL` creates it with the toolkit's tables)")
    return u.render_as_string(hide_password=False)


def make_engine(url: str, *, create: bool = False, **kw: Any) -> sa.Engine:
    """An engine for ``--db``; a bad URL or a missing driver is one :class:`ConfigurationError`."""
    url = database_url(url, create=create)
    if url.startswith("sqlite"):
        kw.setdefault("connect_args", {"timeout": 30})
    else:
        kw.setdefault("pool_pre_ping", True)
    try:
        return sa.create_engine(url, **kw)
    except sa.exc.NoSuchModuleError:
        backend = sa.engine.make_url(url).get_backend_name()
        raise ConfigurationError(f"--db {masked_url(url)}: unknown database kind {backend!r}; use postgresql://, "
                                 "mysql://, mariadb:// or sqlite:///FILE") from None
    except ImportError as exc:
        backend = sa.engine.make_url(url).get_backend_name()
        extra = _EXTRA_OF_BACKEND.get(backend)
        hint = f"pip install 'outboxkit[{extra}]'" if extra else "install the driver"
        raise ConfigurationError(f"the database driver for {masked_url(url)} is not installed "
                                 f"({exc.name or one_line(exc)}): {hint}") from None
    except sa.exc.ArgumentError as exc:
        raise ConfigurationError(f"--db {masked_url(url)!r} is not usable: {one_line(exc)}") from None


#: per backend, the async drivers to use (the first installed), the module of each and the pip hint
_ASYNC_DRIVERS = {
    "postgresql": (("psycopg", "asyncpg"), "'psycopg[binary]' (or asyncpg)"),
    "mysql": (("asyncmy", "aiomysql"), "aiomysql (or asyncmy)"),
    "mariadb": (("asyncmy", "aiomysql"), "aiomysql (or asyncmy)"),
    "sqlite": (("aiosqlite",), "'outboxkit[sqlite-async]' (aiosqlite)"),
}
_ASYNC_CAPABLE = {"psycopg", "asyncpg", "asyncmy", "aiomysql", "aiosqlite"}
_SYNC_OF_ASYNC = {"asyncpg": "psycopg", "asyncmy": "pymysql", "aiomysql": "pymysql", "aiosqlite": "pysqlite"}


def sync_database_url(url: str) -> str:
    """``url`` with an async-only driver (asyncpg, aiosqlite, aiomysql, asyncmy) swapped for the sync one
    of its backend, so the CLI can check the schema before an async consumer starts; else unchanged."""
    try:
        u = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError, TypeError):
        return url  # database_url() reports it
    backend, _, driver = u.drivername.partition("+")
    if driver in _SYNC_OF_ASYNC:
        return u.set(drivername=f"{backend}+{_SYNC_OF_ASYNC[driver]}").render_as_string(hide_password=False)
    return url


def make_async_engine(engine: sa.Engine, *, given: str | None = None) -> Any:
    """An ``AsyncEngine`` on the database of ``engine`` (the checked ``--db``): the same driver when it is
    async-capable (psycopg 3), else the backend's async driver (``given``: the URL as typed, when it named one);
    a missing async driver is a :class:`ConfigurationError` saying what to pip install."""
    from sqlalchemy.ext.asyncio import create_async_engine

    u = engine.url
    backend, _, driver = u.drivername.partition("+")
    if given is not None:
        typed = sa.engine.make_url(given).drivername.partition("+")[2]
        driver = typed if typed in _ASYNC_CAPABLE else driver
    if driver not in _ASYNC_CAPABLE:
        candidates, hint = _ASYNC_DRIVERS.get(backend, ((), "an asyncio driver for it"))
        chosen = next((d for d in candidates if _installed(d)), None)
        if chosen is None:
            raise ConfigurationError(f"an async consumer needs an asyncio driver for {masked_url(u)}: "
                                     f"pip install {hint}")
        driver = chosen
    url = u.set(drivername=f"{backend}+{driver}")
    kw: dict[str, Any] = {"connect_args": {"timeout": 30}} if backend == "sqlite" else {"pool_pre_ping": True}
    try:
        return create_async_engine(url, **kw)
    except ImportError as exc:
        raise ConfigurationError(f"the asyncio database driver for {masked_url(url)} is not installed "
                                 f"({exc.name or one_line(exc)})") from None


def require_schema(engine: sa.Engine, tables: OutboxTables, *, daemon: bool = False) -> None:
    """Connect once and check the toolkit's tables are there: a forgotten ``db upgrade`` is one
    clear error naming the command to run, never a SQL error later on.

    ``daemon`` (relay, consume): a database that cannot be reached yet is not an error here; the
    daemon waits for it with backoff, as it does for an outage later on.
    """
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            missing = [t.name for t in tables.all() if not inspector.has_table(t.name, schema=t.schema)]
    except sa.exc.DBAPIError as exc:
        if daemon and isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
            log.warning("cannot reach %s yet (%s): waiting for it", masked_url(engine.url), one_line(exc))
            return
        raise DatabaseError(f"cannot connect to {masked_url(engine.url)}: {one_line(exc)}") from None
    if missing:
        extra = ""
        if tables.names.outbox != "outbox_messages":
            extra = " with the same --table-prefix/--schema"
        which = "" if len(missing) == len(tables.all()) else f" ({', '.join(missing)})"
        raise SchemaMissing(f"the toolkit's tables are missing in {masked_url(engine.url)}{which}: "
                            f"run `outbox db upgrade --db URL`{extra} first")


def open_database(args: argparse.Namespace, *, check_schema: bool = True, daemon: bool = False,
                  **kw: Any) -> sa.Engine:
    """The engine of ``--db``, checked: URL, driver, file, connection and (optionally) tables."""
    engine = make_engine(require_db(args), **kw)
    if check_schema:
        try:
            require_schema(engine, tables_from_args(args), daemon=daemon)
        except BaseException:
            engine.dispose()
            raise
    return engine


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> dt.timedelta:
    """``'14d'``, ``'2h'``, ``'30m'``, ``'45s'``, ``'250ms'`` or plain seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise ConfigurationError(f"{text!r} is not a duration: use e.g. 30s, 15m, 2h, 14d")
    return dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def _json_default(o: Any) -> Any:
    if isinstance(o, (dt.datetime, dt.date)):
        return o.isoformat()
    if isinstance(o, uuid.UUID):
        return str(o)
    if isinstance(o, (bytes, bytearray, memoryview)):
        return bytes(o).decode("utf-8", "replace")
    return str(o)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, default=_json_default, indent=2)
    sys.stdout.write("\n")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    s = str(v).replace("\n", " ")
    return s if len(s) <= 60 else s[:57] + "..."
