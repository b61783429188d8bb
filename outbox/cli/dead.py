"""``outbox dead list|show|requeue|purge``: messages the relay (or a consumer) gave up on."""

from __future__ import annotations

import argparse
from typing import Any

from .. import admin
from ..errors import ConfigurationError
from ._common import (
    add_db_args,
    make_engine,
    parse_duration,
    print_json,
    print_table,
    require_db,
    tables_from_args,
)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "dead", help="list, show, requeue or purge dead messages",
        description="Without --consumer these are outbox rows the relay could not publish; with "
        "--consumer NAME, messages that consumer dead-lettered.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name, helptext in (("list", "list dead messages"), ("show", "show one dead message in full"),
                           ("requeue", "send dead messages again"), ("purge", "delete dead messages for good")):
        a = actions.add_parser(name, help=helptext)
        add_db_args(a)
        a.add_argument("--consumer", help="a dedup consumer's dead letters instead of outbox rows")
        a.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "show":
            a.add_argument("id", type=int)
        else:
            a.add_argument("--id", dest="ids", type=int, action="append", help="row id (repeatable)")
            a.add_argument("--topic")
            a.add_argument("--key")
            a.add_argument("--older-than", type=parse_duration, help="e.g. 2h, 14d")
        if name == "list":
            a.add_argument("--limit", type=int, default=100)
        if name in ("requeue", "purge"):
            a.add_argument("--all", action="store_true", help="act on every dead message (no filter needed)")
        a.set_defaults(func=run)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"ids": args.ids, "topic": args.topic, "key": args.key, "older_than": args.older_than}


def run(args: argparse.Namespace) -> int:
    engine = make_engine(require_db(args))
    tables = tables_from_args(args)
    try:
        if args.consumer:
            return _consumer(args, engine, tables)
        return _outbox(args, engine, tables)
    finally:
        engine.dispose()


def _need_filter(args: argparse.Namespace) -> None:
    if not args.all and not any(v for v in _filters(args).values()):
        raise ConfigurationError(f"`dead {args.action}` needs a filter (--id, --topic, --key, --older-than) or --all")


def _outbox(args: argparse.Namespace, engine: Any, tables: Any) -> int:
    if args.action == "list":
        rows = admin.list_dead(engine, tables=tables, topic=args.topic, key=args.key, older_than=args.older_than,
                               limit=args.limit)
        if args.ids:
            rows = [r for r in rows if r["id"] in set(args.ids)]
        if args.json:
            print_json(rows)
        else:
            print_table(rows, ["id", "message_id", "topic", "key", "attempts", "created_at", "last_error"])
        return 0
    if args.action == "show":
        row = admin.get_dead(engine, args.id, tables=tables)
        if row is None:
            raise ConfigurationError(f"no outbox row with id {args.id}")
        row["payload"] = bytes(row["payload"]).decode("utf-8", "replace")
        if args.json:
            print_json(row)
        else:
            for k, v in row.items():
                print(f"{k:>13}: {v}")
        return 0
    _need_filter(args)
    if args.action == "requeue":
        n = admin.requeue_dead(engine, tables=tables, **_filters(args))
        _report(args, "requeued", n)
    else:
        n = admin.purge_dead(engine, tables=tables, **_filters(args))
        _report(args, "purged", n)
    return 0


def _consumer(args: argparse.Namespace, engine: Any, tables: Any) -> int:
    from consumers import deadletters as dl

    if args.action == "list":
        rows = dl.list_dead_letters(engine, tables=tables, consumer=args.consumer, topic=args.topic, key=args.key,
                                    older_than=args.older_than, limit=args.limit)
        if args.ids:
            rows = [r for r in rows if r["id"] in set(args.ids)]
        if args.json:
            print_json(rows)
        else:
            print_table(rows, ["id", "consumer", "message_id", "topic", "key", "attempts", "last_failed_at", "error"])
        return 0
    if args.action == "show":
        row = dl.get_dead_letter(engine, args.id, tables=tables)
        if row is None:
            raise ConfigurationError(f"no dead letter with id {args.id}")
        if isinstance(row.get("payload"), (bytes, bytearray, memoryview)):
            row["payload"] = bytes(row["payload"]).decode("utf-8", "replace")
        if args.json:
            print_json(row)
        else:
            for k, v in row.items():
                print(f"{k:>15}: {v}")
        return 0
    _need_filter(args)
    fn = dl.requeue_dead_letters if args.action == "requeue" else dl.purge_dead_letters
    n = fn(engine, tables=tables, consumer=args.consumer, **_filters(args))
    _report(args, "requeued" if args.action == "requeue" else "purged", n)
    return 0


def _report(args: argparse.Namespace, verb: str, n: int) -> None:
    if args.json:
        print_json({verb: n})
    else:
        print(f"{verb} {n} message(s)")
