"""``outbox dead list|show|requeue|purge``: messages the relay (or a consumer) gave up on."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import admin
from ..errors import ConfigurationError
from ._common import (
    add_db_args,
    open_database,
    parse_duration,
    print_json,
    print_table,
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
        if name == "purge":
            a.add_argument("--with-blocked", action="store_true",
                           help="also delete the pending messages of the same topic and key held back behind "
                           "them (a poison key's whole stuck stream, in one go)")
        a.set_defaults(func=run)


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"ids": args.ids, "topic": args.topic, "key": args.key, "older_than": args.older_than}


@dataclass(frozen=True)
class _Kind:
    """The storage operations behind one kind of dead message, so one flow serves both."""

    list: Callable[..., list[dict[str, Any]]]
    get: Callable[[int], dict[str, Any] | None]
    requeue: Callable[..., int]
    purge: Callable[..., int]
    columns: list[str]
    missing: str
    behind: Callable[..., int] | None = None
    """pending messages held back behind the selected dead ones (outbox rows only)"""


def _outbox_kind(engine: Any, tables: Any) -> _Kind:
    return _Kind(
        list=lambda **f: admin.list_dead(engine, tables=tables, **f),
        get=lambda row_id: admin.get_dead(engine, row_id, tables=tables),
        requeue=lambda **f: admin.requeue_dead(engine, tables=tables, **f),
        purge=lambda **f: admin.purge_dead(engine, tables=tables, **f),
        columns=["id", "message_id", "topic", "key", "attempts", "created_at", "last_error"],
        missing="no outbox row with id",
        behind=lambda **f: admin.pending_behind(engine, tables=tables, **f),
    )


def _consumer_kind(engine: Any, tables: Any, consumer: str) -> _Kind:
    from consumers import deadletters as dl

    return _Kind(
        list=lambda **f: dl.list_dead_letters(engine, tables=tables, consumer=consumer, **f),
        get=lambda row_id: dl.get_dead_letter(engine, row_id, tables=tables),
        requeue=lambda **f: dl.requeue_dead_letters(engine, tables=tables, consumer=consumer, **f),
        purge=lambda **f: dl.purge_dead_letters(engine, tables=tables, consumer=consumer, **f),
        columns=["id", "consumer", "message_id", "topic", "key", "attempts", "last_failed_at", "error"],
        missing="no dead letter with id",
    )


def run(args: argparse.Namespace) -> int:
    engine = open_database(args)
    tables = tables_from_args(args)
    try:
        kind = _consumer_kind(engine, tables, args.consumer) if args.consumer else _outbox_kind(engine, tables)
        return _act(args, kind)
    finally:
        engine.dispose()


def _need_filter(args: argparse.Namespace) -> None:
    if not args.all and not any(v for v in _filters(args).values()):
        raise ConfigurationError(f"`dead {args.action}` needs a filter (--id, --topic, --key, --older-than) or --all")


def _act(args: argparse.Namespace, kind: _Kind) -> int:
    if args.action == "list":
        rows = kind.list(topic=args.topic, key=args.key, older_than=args.older_than, limit=args.limit)
        if args.ids:
            rows = [r for r in rows if r["id"] in set(args.ids)]
        if args.json:
            print_json(rows)
        else:
            print_table(rows, kind.columns)
        return 0
    if args.action == "show":
        row = kind.get(args.id)
        if row is None:
            raise ConfigurationError(f"{kind.missing} {args.id}")
        if isinstance(row.get("payload"), (bytes, bytearray, memoryview)):
            row["payload"] = bytes(row["payload"]).decode("utf-8", "replace")
        if args.json:
            print_json(row)
        else:
            width = max(len(k) for k in row)
            for k, v in row.items():
                print(f"{k:>{width}}: {v}")
        return 0
    _need_filter(args)
    if args.action == "requeue":
        _report(args, "requeued", kind.requeue(**_filters(args)))
        return 0
    if getattr(args, "with_blocked", False):
        if kind.behind is None:
            raise ConfigurationError("--with-blocked applies to outbox rows, not to a consumer's dead letters")
        _report(args, "purged", kind.purge(**_filters(args), with_blocked=True))
        return 0
    behind = kind.behind(**_filters(args)) if kind.behind is not None else 0
    _report(args, "purged", kind.purge(**_filters(args)), released=behind)
    return 0


def _report(args: argparse.Namespace, verb: str, n: int, released: int = 0) -> None:
    if args.json:
        print_json({verb: n, **({"released": released} if released else {})})
        return
    print(f"{verb} {n} message(s)")
    if released:
        print(f"{released} pending message(s) of the same topic and key were held back behind them and will now "
              "be sent; to drop them as well, purge with --with-blocked", file=sys.stderr)
