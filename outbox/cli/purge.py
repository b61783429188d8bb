"""``outbox purge``: retention for processed ids (consumers) and published rows (outbox audit mode).

On PostgreSQL's partitioned layout (``outbox db upgrade --layout partitioned``) whole day partitions
older than the window are dropped; elsewhere rows are deleted in short transactions, each over one
range of the primary key, so no long locks. See docs/retention.md.
The processed-ids window must be longer than the longest redelivery the broker can make.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from ..config import Setting
from ..errors import ConfigurationError
from ..retention import purge_published
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
