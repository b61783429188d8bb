"""``outbox status``: backlog, dead messages, relays and who holds which partition."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from .._redact import mask_secrets
from ..admin import outbox_status
from ..dialects.pg_partitions import PartitionNames
from ..errors import ConfigurationError, OutboxError
from ..leases import _ranges
from ._common import add_db_args, one_line, open_database, parse_duration, print_json, tables_from_args

#: exit codes of ``outbox status --check`` (the Nagios plugin convention)
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


def _duration(text: str) -> float:
    try:
        return parse_duration(text).total_seconds()
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: use a whole number, 0 or more")
    return n


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status", help="backlog, dead messages and relay leases",
        description="Backlog, blocked and dead messages, relays and partition leases. With --check: one "
        "status line and a Nagios-style exit code: 0 OK, 1 WARNING (rows pending and no live relay, or "
        "rows of an unknown status), 2 CRITICAL (a --max-* threshold exceeded), 3 UNKNOWN (database "
        "unreachable, tables missing, bad arguments).")
    add_db_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (see docs/operations.md)")
    p.add_argument("--check", action="store_true", help="one status line and exit 0/1/2/3 (cron, Nagios)")
    p.add_argument("--max-age", type=_duration, metavar="DURATION",
                   help="with --check: CRITICAL when the oldest pending row is older (e.g. 60s, 5m)")
    p.add_argument("--max-dead", type=_count, metavar="N", help="with --check: CRITICAL above N dead rows")
    p.add_argument("--max-blocked", type=_count, metavar="N",
                   help="with --check: CRITICAL above N rows held back behind a failing message")
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
    """A time, or the text a stored time no datetime holds was read as (PostgreSQL's 'infinity')."""
    if ts is None:
        return "-"
    return ts.isoformat(timespec="seconds") if isinstance(ts, dt.datetime) else str(ts)


def check(st: dict[str, Any], *, max_age: float | None = None, max_dead: int | None = None,
          max_blocked: int | None = None) -> tuple[int, list[str]]:
    """The exit code of ``status --check`` and what made it so."""
    critical, warning = [], []
    age = st["oldest_pending_age_s"]
    if max_age is not None and age is not None and age > max_age:
        critical.append(f"oldest pending {_age(age)} > {_age(max_age)}")
    if max_dead is not None and st["dead"] > max_dead:
        critical.append(f"dead {st['dead']} > {max_dead}")
    if max_blocked is not None and st["blocked"] > max_blocked:
        critical.append(f"blocked {st['blocked']} > {max_blocked}")
    if st["pending"] and not any(r["alive"] for r in st["relays"]):
        warning.append(f"{st['pending']} pending and no live relay")
    if st.get("unknown_status"):
        warning.append(f"{st['unknown_status']} row(s) of unknown status")
    if critical:
        return CRITICAL, critical + warning
    return (WARNING, warning) if warning else (OK, [])


def _perfdata(st: dict[str, Any]) -> str:
    age = st["oldest_pending_age_s"]
    return (f"pending={st['pending']} due={st['due']} blocked={st['blocked']} dead={st['dead']} "
            f"oldest_age={0 if age is None else round(age, 1)}s")


def _run_check(args: argparse.Namespace) -> int:
    try:
        engine = open_database(args)
        try:
            st = outbox_status(engine, tables=tables_from_args(args))
        finally:
            engine.dispose()
    except Exception as exc:  # the database or its tables, not the outbox, are the problem
        text = mask_secrets(exc) if isinstance(exc, OutboxError) else f"{type(exc).__name__}: {one_line(exc)}"
        print(f"OUTBOX UNKNOWN - {text}")
        return UNKNOWN
    code, problems = check(st, max_age=args.max_age, max_dead=args.max_dead, max_blocked=args.max_blocked)
    summary = "; ".join(problems) if problems else (
        f"{st['pending']} pending, oldest {_age(st['oldest_pending_age_s'])}, {st['dead']} dead")
    if args.json:
        print_json({"status": _NAMES[code], "code": code, "problems": problems})
    else:
        print(f"OUTBOX {_NAMES[code]} - {summary} | {_perfdata(st)}")
    return code


def run(args: argparse.Namespace) -> int:
    if args.check:
        return _run_check(args)
    if any(v is not None for v in (args.max_age, args.max_dead, args.max_blocked)):
        raise ConfigurationError("--max-age, --max-dead and --max-blocked go with --check")
    engine = open_database(args)
    tables = tables_from_args(args)
    try:
        st = outbox_status(engine, tables=tables)
    finally:
        engine.dispose()
    if args.json:
        st = {k: v for k, v in st.items() if k != "leases"}
        print_json(st)
        return 0
    print(f"pending:        {st['pending']} ({st['due']} due now, {st['retrying']} retrying, "
          f"{st['blocked']} blocked)")
    print(f"oldest pending: {_age(st['oldest_pending_age_s'])}")
    if st["waiting"]:
        print(f"not due yet:    {st['waiting']} ({st['delayed']} written with a delay, the rest retrying), "
              f"next due at {_when(st['waiting_next_due_at'])}")
    if st["blocked"]:
        print(f"blocked:        {st['blocked']} held back (strict ordering) behind {len(st['blocked_by'])} "
              "failing message(s):")
        for topic, t in st["blocked_by_topic"].items():
            print(f"  topic {topic!r}: {t['blocked']} row(s) behind {t['blockers']} message(s), waiting since "
                  f"{_when(t['waiting_since'])}")
            for b in st["blocked_by"]:
                if b["topic"] == topic:
                    print("    " + _blocker_line(b))
    print(f"dead:           {st['dead']}" + ("  (see `outbox dead list`)" if st["dead"] else ""))
    if st.get("unknown_status"):
        print(f"unknown status: {st['unknown_status']}  (not sent; the relay marks them dead with the reason)")
    if st.get("published"):
        archive = PartitionNames.of(tables.names).archive if st["archived"] else ""
        about = "~" if st.get("published_estimate") else ""
        archived = f"~{st['archived']}" if st.get("archived_estimate") else str(st["archived"])
        print(f"published:      {about}{st['published']}  (kept in audit mode"
              + (f"; {archived} of them in {archive}" if archive else "")
              + ("; the database's estimate, not an exact count" if about else "") + ")")
    print(f"partitions:     {st['partitions']}")
    live = [r for r in st["relays"] if r["alive"]]
    print(f"relays:         {len(live)} alive" + (f", {len(st['relays']) - len(live)} expired"
                                                  if len(live) < len(st["relays"]) else ""))
    for group, g in st["relays_by_group"].items():
        print(f"  group {group}: {g['alive']} alive, {g['expired']} expired, last heartbeat "
              f"{_when(g['last_heartbeat_at'])}")
    for r in st["relays"]:
        parts = st["partition_owners"].get(r["relay_id"], [])
        state = "alive" if r["alive"] else "gone"
        print(f"  {r['relay_id']:<40} {state:<5} pid {r['pid']:<7} partitions {_ranges(parts)} ({len(parts)})")
        broker = " ".join(x for x in (r.get("broker_kind"), r.get("broker_target")) if x) or "unknown broker"
        beat = f"heartbeat {_age(r['heartbeat_age_s'])} ago" + (", lease expired" if r["lease_expired"] else "")
        print(f"    group {r.get('relay_group') or 'default'}, {broker}, topics {r.get('topics') or '*'}, {beat}")
    for group, free in sorted(st.get("unowned_partitions_by_group", {}).items()):
        print(f"  unowned partitions of group {group}: {_ranges(free)}")
    return 0
