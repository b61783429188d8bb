"""``outbox db``: create, upgrade and inspect the toolkit's tables (its own Alembic migrations).

::

    outbox db upgrade [REVISION]          # default: head
    outbox db downgrade REVISION          # e.g. base: drops every toolkit table
    outbox db current [--json] [--check]  # the revision the database is at, and whether it is the head
    outbox db heads                       # the newest revision this installed version ships
    outbox db sql [--from REV] [--to REV] (--db URL | --dialect NAME)   # offline DDL for a DBA

The toolkit keeps its own version table (``outbox_alembic_version``), so these commands never touch
an application's ``alembic_version``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from .. import migrations
from .._redact import mask_secrets
from ..errors import ConfigurationError, DatabaseError
from ..schema import OutboxTables
from ._common import (
    DEFAULT_DB_ENV,
    add_db_args,
    database_url,
    make_engine,
    masked_url,
    one_line,
    open_database,
    print_json,
    require_db,
    tables_from_args,
)

#: ``outbox db sql --dialect NAME`` -> a driver-less URL; only the dialect is used, nothing connects
OFFLINE_DIALECT_URLS = {
    "postgresql": "postgresql://",
    "mysql": "mysql://",
    "mariadb": "mariadb://",
    "sqlite": "sqlite://",
}
_NO_REVISION = "none (run `outbox db upgrade`)"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "db", help="create / upgrade the toolkit's tables (its own Alembic migrations)",
        description="The toolkit's own Alembic migrations, with their own version table "
                    f"({migrations.VERSION_TABLE}); your application's alembic_version is never touched.",
    )
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION")
    dbsub.required = True

    up = dbsub.add_parser("upgrade", help="create the tables or upgrade them to REVISION (default: head)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    up.add_argument("--layout", choices=migrations.LAYOUTS, default="plain",
                    help="retention layout revision 0005 creates: plain (purge by batched DELETE) or partitioned "
                         "(PostgreSQL: purge drops whole day partitions; docs/retention.md)")
    add_db_args(up)
    up.set_defaults(func=run_upgrade)

    parts = dbsub.add_parser("partitions", help="partitioned layout: create the coming days' partitions now, "
                                                "move the dedup bucket to today")
    parts.add_argument("--ahead", type=int, default=3, help="days of partitions to keep created ahead (default 3)")
    parts.add_argument("--json", action="store_true", help="machine-readable output")
    add_db_args(parts)
    parts.set_defaults(func=run_partitions)

    down = dbsub.add_parser("downgrade", help="downgrade to REVISION ('base' drops every toolkit table)")
    down.add_argument("revision", help="target revision, e.g. base")
    down.add_argument("--yes", action="store_true",
                      help="drop tables even when they hold rows (pending messages, dedup ids, dead letters)")
    add_db_args(down)
    down.set_defaults(func=run_downgrade)

    cur = dbsub.add_parser("current", help="the revision the database is at, and whether it is the head")
    add_db_args(cur)
    cur.add_argument("--json", action="store_true", help="machine-readable output")
    cur.add_argument("--check", action="store_true", help="exit with 1 unless the database is at the head")
    cur.set_defaults(func=run_current)

    heads = dbsub.add_parser("heads", help="the newest revision(s) this installed version ships")
    heads.add_argument("--json", action="store_true", help="machine-readable output")
    heads.set_defaults(func=run_heads)

    sql = dbsub.add_parser(
        "sql", help="print the DDL (offline, nothing is executed or connected) for a DBA to review and run",
        description="Print the DDL to migrate from --from (default: an empty database) to --to (default: "
                    "head), for the dialect of --db URL or --dialect NAME. Nothing connects to a database.",
    )
    sql.add_argument("--from", dest="from_revision", default=None, metavar="REV",
                     help="revision the database is at now (default: nothing created yet)")
    sql.add_argument("--to", dest="to_revision", default="head", metavar="REV", help="target revision (default: head)")
    sql.add_argument("--dialect", choices=sorted(OFFLINE_DIALECT_URLS), default=None,
                     help="target database kind, instead of --db")
    add_db_args(sql)
    sql.set_defaults(func=run_sql, db=None)  # --db is not read from the environment here: see _offline_url


# --------------------------------------------------------------------------- helpers


def _quiet_alembic() -> None:
    """Alembic logs its plugins and context at INFO; the commands print their own summary instead."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _masked(url: str) -> str:
    return masked_url(url)


def _one_line(exc: BaseException) -> str:
    return one_line(exc)


def _engine(url: str, *, create: bool = False) -> sa.Engine:
    return make_engine(url, create=create, poolclass=sa.pool.NullPool)


@contextmanager
def _connection(url: str, *, create: bool = False) -> Iterator[sa.Connection]:
    """One connection in a transaction; a database that cannot be reached is one clear error."""
    engine = _engine(url, create=create)
    try:
        try:
            conn = engine.connect()
        except sa.exc.DBAPIError as exc:
            raise DatabaseError(f"cannot connect to {_masked(url)}: {_one_line(exc)}")
        with conn:
            try:
                with conn.begin():
                    yield conn
            except sa.exc.DBAPIError as exc:
                raise DatabaseError(f"migration on {_masked(url)} failed: {_one_line(exc)}")
    finally:
        engine.dispose()


@contextmanager
def _alembic_errors() -> Iterator[None]:
    """An unknown revision and the like: Alembic's message, as a configuration error."""
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:
        raise ConfigurationError(f"alembic: {mask_secrets(exc)}")


def _describe(revision: str | None) -> str:
    return revision if revision is not None else "none"


def _status(url: str, tables: OutboxTables) -> dict[str, Any]:
    with _connection(url) as conn:
        rev = migrations.current(conn, tables=tables)
    heads = migrations.heads()
    return {
        "database": _masked(url),
        "version_table": migrations.version_table_for(tables),
        "schema": tables.names.schema,
        "revision": rev,
        "heads": heads,
        "is_head": rev is not None and rev in heads,
    }


# --------------------------------------------------------------------------- commands


def _migrate(args: argparse.Namespace, step: Callable[..., None], verb: str) -> int:
    """Run ``step`` (upgrade or downgrade) to ``args.revision`` and say what changed."""
    _quiet_alembic()
    url = require_db(args)
    tables = tables_from_args(args)
    with _connection(url, create=step is migrations.upgrade) as conn, _alembic_errors():
        before = migrations.current(conn, tables=tables)
        if step is migrations.downgrade and not args.yes:
            at_risk = migrations.rows_dropped_by_downgrade(conn, args.revision, tables=tables)
            if at_risk:
                counts = ", ".join(f"{name} {n:,} row(s)" for name, n in at_risk.items())
                print(f"error: refusing to downgrade {_masked(url)} to {args.revision}: it drops tables that "
                      f"hold rows, which would be lost: {counts}. Lost dedup ids mean old messages get "
                      "processed again; lost outbox rows are never published. Re-run with --yes to drop them.",
                      file=sys.stderr)
                return 1
        if step is migrations.upgrade:
            step(conn, args.revision, tables=tables, layout=args.layout)
        else:
            step(conn, args.revision, tables=tables)
        after = migrations.current(conn, tables=tables)
    if before == after:
        print(f"{_masked(url)}: already at {_describe(after)}, nothing to do")
    else:
        dropped = "  (every toolkit table dropped)" if after is None else ""
        print(f"{_masked(url)}: {verb} {_describe(before)} -> {_describe(after)}{dropped}")
    return 0


def run_upgrade(args: argparse.Namespace) -> int:
    return _migrate(args, migrations.upgrade, "upgraded")


def run_partitions(args: argparse.Namespace) -> int:
    from ..retention import maintain_partitions

    if not 0 <= args.ahead <= 366:
        raise ConfigurationError(f"--ahead must be between 0 and 366 days, got {args.ahead}")
    engine = open_database(args)
    try:
        out = maintain_partitions(engine, tables=tables_from_args(args), ahead=args.ahead)
    finally:
        engine.dispose()
    if args.json:
        print_json(out)
    elif out["layout"] == "plain":
        print("plain layout: no partitions to create (see `outbox db upgrade --layout partitioned`)")
    else:
        print(f"partitions created: {', '.join(out['created']) or 'none missing'}; dedup bucket {out['bucket']}"
              + (f"; skipped (tables busy, try again): {', '.join(out['skipped'])}" if out["skipped"] else ""))
    return 0


def run_downgrade(args: argparse.Namespace) -> int:
    return _migrate(args, migrations.downgrade, "downgraded")


def run_current(args: argparse.Namespace) -> int:
    _quiet_alembic()
    url = require_db(args)
    st = _status(url, tables_from_args(args))
    if args.json:
        print_json(st)
    else:
        rev = st["revision"]
        heads = ", ".join(st["heads"])
        if rev is None:
            state = _NO_REVISION
        elif st["is_head"]:
            state = f"{rev} (head)"
        else:
            state = f"{rev} (not the head: {heads}; run `outbox db upgrade`)"
        print(f"database:      {st['database']}")
        print(f"version table: {st['version_table']}" + (f" (schema {st['schema']})" if st["schema"] else ""))
        print(f"revision:      {state}")
    return 0 if (st["is_head"] or not args.check) else 1


def run_heads(args: argparse.Namespace) -> int:
    heads = migrations.heads()
    if args.json:
        print_json({"heads": heads})
    else:
        for h in heads:
            print(f"{h} (head)")
    return 0


def _offline_url(args: argparse.Namespace) -> str:
    if args.dialect and args.db:
        raise ConfigurationError("give either --db URL or --dialect NAME to `outbox db sql`, not both")
    if args.dialect:
        return OFFLINE_DIALECT_URLS[args.dialect]
    url = args.db or os.environ.get(DEFAULT_DB_ENV)
    if not url:
        raise ConfigurationError(
            f"no target database: pass --dialect {'|'.join(sorted(OFFLINE_DIALECT_URLS))} or --db URL "
            f"(or set {DEFAULT_DB_ENV}); nothing connects to it"
        )
    return database_url(url, offline=True)


def run_sql(args: argparse.Namespace) -> int:
    _quiet_alembic()
    url = _offline_url(args)
    with _alembic_errors():
        try:
            text = migrations.offline_sql(url, args.to_revision, from_revision=args.from_revision,
                                          tables=tables_from_args(args))
        except (ImportError, sa.exc.NoSuchModuleError) as exc:
            raise ConfigurationError(f"no SQLAlchemy dialect for {_masked(url)}: {_one_line(exc)}")
    sys.stdout.write(text)
    if not text.strip():
        print(f"nothing to do: from {args.from_revision} to {args.to_revision} needs no DDL", file=sys.stderr)
    return 0
