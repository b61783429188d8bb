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


def _blocker_line(b: dict[str, Any]) -> str:
    if b["blocking_status"] == "dead":
        what = "dead (requeue or purge it: `outbox dead requeue --id N`)"
    else:
        what = f"retrying (attempt {b['attempts']}, next at {_when(b['retry_at'])})"
    since = _when(b["waiting_since"])
    reason = f": {b['reason']}" if b["reason"] else ""
    return (f"topic {b['topic']!r} key {b['key']!r}: {b['blocked']} row(s) waiting since {since} behind "
            f"row {b['blocking_id']}, {what}{reason}").replace("--id N", f"--id {b['blocking_id']}")


def _when(ts: Any) -> str:
    return "-" if ts is None else ts.isoformat(timespec="seconds")


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
    print(f"pending:        {st['pending']} ({st['due']} due now, {st['retrying']} retrying, "
          f"{st['blocked']} blocked)")
    print(f"oldest pending: {_age(st['oldest_pending_age_s'])}")
    if st["blocked"]:
        print(f"blocked:        {st['blocked']} held back (strict ordering) behind {len(st['blocked_by'])} "
              "failing message(s):")
        for b in st["blocked_by"]:
            print("  " + _blocker_line(b))
    print(f"dead:           {st['dead']}" + ("  (see `outbox dead list`)" if st["dead"] else ""))
    if st.get("unknown_status"):
        print(f"unknown status: {st['unknown_status']}  (not sent; the relay marks them dead with the reason)")
    if st.get("published"):
        print(f"published:      {st['published']}  (kept in audit mode)")
    print(f"partitions:     {st['partitions']}")
    live = [r for r in st["relays"] if r["alive"]]
    print(f"relays:         {len(live)} alive")
    for r in st["relays"]:
        parts = st["partition_owners"].get(r["relay_id"], [])
        state = "alive" if r["alive"] else "gone"
        print(f"  {r['relay_id']:<40} {state:<5} pid {r['pid']:<7} partitions {_ranges(parts)} ({len(parts)})")
        broker = " ".join(x for x in (r.get("broker_kind"), r.get("broker_target")) if x) or "unknown broker"
        print(f"    group {r.get('relay_group') or 'default'}, {broker}, topics {r.get('topics') or '*'}")
    for group, free in sorted(st.get("unowned_partitions_by_group", {}).items()):
        print(f"  unowned partitions of group {group}: {_ranges(free)}")
    return 0
