"""``outbox purge``: retention for processed ids (consumers) and published rows (outbox audit mode).

Both delete in short transactions (select a batch of keys, delete those keys), so no long locks.
The processed-ids window must be longer than the longest redelivery the broker can make.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ..config import Setting
from ..errors import ConfigurationError
from ..schema import STATUS_PUBLISHED, OutboxTables
from ._common import add_db_args, open_database, parse_duration, print_json, tables_from_args
from ._settings import add_settings, resolve

__all__ = ["purge_published", "register"]

#: read when the command runs, so a bad value breaks only `outbox purge`, with a one-line error
BATCH_SIZE = Setting("batch_size", kind="int", minimum=1, maximum=100_000, default=5000,
                     help="rows per short transaction", env=("OUTBOX_PURGE_BATCH_SIZE",), flags=("--batch-size",))


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "purge", help="delete old processed-message ids or published outbox rows",
        description="Retention. Keep processed ids longer than the longest redelivery your broker can make "
        "(Kafka retention / consumer lag, RabbitMQ unacked or dead-letter loops).",
    )
    what = p.add_subparsers(dest="what", metavar="WHAT")
    what.required = True
    for name, helptext in (("processed", "processed-message ids of dedup consumers"),
                           ("published", "published outbox rows (audit mode)")):
        a = what.add_parser(name, help=helptext)
        add_db_args(a)
        a.add_argument("--older-than", required=True, help="age cutoff, e.g. 14d, 12h")
        add_settings(a, [BATCH_SIZE])
        a.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "processed":
            a.add_argument("--consumer", help="only this consumer's ids")
        a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    batch_size = resolve([BATCH_SIZE], args, table="purge", file={}, file_label=None).get("batch_size", 5000)
    older_than = parse_duration(args.older_than)
    if older_than <= dt.timedelta(0):
        raise ConfigurationError("--older-than must be more than zero")
    engine = open_database(args)
    tables = tables_from_args(args)
    try:
        if args.what == "processed":
            from consumers.retention import purge_processed

            n = purge_processed(engine, older_than=older_than, consumer=args.consumer, batch_size=batch_size,
                                tables=tables)
        else:
            n = purge_published(engine, older_than=older_than, batch_size=batch_size, tables=tables)
    finally:
        engine.dispose()
    if args.json:
        print_json({"purged": n, "what": args.what})
    else:
        print(f"purged {n} {args.what} row(s) older than {args.older_than}")
    return 0


def purge_published(
    engine: sa.Engine, *, older_than: dt.timedelta, batch_size: int = 5000, tables: OutboxTables | None = None
) -> int:
    """Delete outbox rows with status ``published`` and ``published_at`` older than the cutoff."""
    from ..schema import default_tables

    if not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
        raise ConfigurationError(f"--batch-size must be between 1 and 100000, got {batch_size!r}")
    t = (tables or default_tables()).outbox
    cutoff = dt.datetime.now(dt.timezone.utc) - older_than
    conds = [t.c.status == STATUS_PUBLISHED, t.c.published_at < cutoff]
    total = 0
    while True:
        with engine.begin() as conn:
            ids = conn.execute(sa.select(t.c.id).where(*conds).order_by(t.c.id).limit(batch_size)).scalars().all()
            if not ids:
                break
            total += int(conn.execute(t.delete().where(t.c.id.in_(ids), *conds)).rowcount)
        if len(ids) < batch_size:
            break
    return total
