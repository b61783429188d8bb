"""``outbox status``: backlog, dead messages, relays and who holds which partition."""

from __future__ import annotations

import argparse
from typing import Any

from ..admin import outbox_status
from ..leases import _ranges
from ._common import add_db_args, open_database, print_json, tables_from_args


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("status", help="backlog, dead messages and relay leases")
    add_db_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def run(args: argparse.Namespace) -> int:
    engine = open_database(args)
    try:
        st = outbox_status(engine, tables=tables_from_args(args))
    finally:
        engine.dispose()
    if args.json:
        st = {k: v for k, v in st.items() if k != "leases"}
        print_json(st)
        return 0
    print(f"pending:        {st['pending']} ({st['due']} due now, {st['retrying']} retrying)")
    print(f"oldest pending: {_age(st['oldest_pending_age_s'])}")
    print(f"dead:           {st['dead']}" + ("  (see `outbox dead list`)" if st["dead"] else ""))
    print(f"partitions:     {st['partitions']}")
    live = [r for r in st["relays"] if r["alive"]]
    print(f"relays:         {len(live)} alive")
    for r in st["relays"]:
        parts = st["partition_owners"].get(r["relay_id"], [])
        state = "alive" if r["alive"] else "gone"
        print(f"  {r['relay_id']:<40} {state:<5} pid {r['pid']:<7} partitions {_ranges(parts)} ({len(parts)})")
    if st["unowned_partitions"]:
        print(f"  unowned partitions: {_ranges(st['unowned_partitions'])}")
    return 0
