"""Helpers shared by the sub-commands: database options, engines, JSON output."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import uuid
from typing import Any

import sqlalchemy as sa

from ..errors import ConfigurationError
from ..schema import OutboxTables, TableNames

DEFAULT_DB_ENV = "OUTBOX_DB_URL"


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


def make_engine(url: str, **kw: Any) -> sa.Engine:
    if url.startswith("sqlite"):
        kw.setdefault("connect_args", {"timeout": 30})
    else:
        kw.setdefault("pool_pre_ping", True)
    return sa.create_engine(url, **kw)


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
