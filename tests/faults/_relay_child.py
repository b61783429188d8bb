"""One relay in its own process, with fault points the parent test can arm (test code only).

Usage: ``python _relay_child.py [--set FIELD=VALUE ...] -- <the arguments of `outbox relay`>``

The relay is built exactly as ``outbox relay`` builds it (``outbox.cli.relay.build``), then run as
a subclass of :class:`outbox.relay.Relay` whose steps are wrapped with fault points. ``--set``
overrides :class:`~outbox.config.RelayConfig` fields that have no command-line flag (for example
``publish_timeout``).

Protocol (JSON lines). The parent writes commands on stdin:

- ``{"cmd": "arm", "point": P, "action": A}``: the next time point ``P`` is reached with rows in
  hand, report it and then apply ``A``: ``stop`` (SIGSTOP itself: the parent sends SIGCONT),
  ``kill`` (SIGKILL itself), ``hold`` (block that step until ``release``) or ``report`` (go on).
- ``{"cmd": "release", "point": P}``: let a held step go on.

The child writes events on stdout: ``started`` (after each ``Relay.start``, with the partitions it
holds), ``point`` (``point``, ``rows``, ``first_id``, ``last_id``), ``error`` and ``exit``.

Points: ``after_claim`` (``_claim_rows`` returned rows), ``before_publish`` / ``after_publish``
(before ``_begin_publish`` sends a batch / after ``_verdicts`` has its verdicts), ``after_mark``
(``_mark`` returned). A point whose method no longer exists on ``Relay`` is an ``error`` event
and exit code 3, so a refactoring cannot silently turn a fault case into a no-op.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from outbox.cli import build_parser, setup_logging
from outbox.cli._common import tables_from_args
from outbox.cli.relay import build
from outbox.config import RelayConfig
from outbox.relay import Relay

#: point -> (Relay method, "before" | "after")
POINTS = {
    "after_claim": ("_claim_rows", "after"),  # every claim, the ones made ahead (pipelined) too
    "before_publish": ("_begin_publish", "before"),
    "after_publish": ("_verdicts", "after"),
    "after_mark": ("_mark", "after"),
}

_out_lock = threading.Lock()


def say(event: str, **kw: object) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps({"event": event, **kw}, default=str) + "\n")
        sys.stdout.flush()


class Points:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.armed: dict[str, str] = {}
        self.released: dict[str, threading.Event] = {}

    def listen(self) -> None:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            cmd = json.loads(line)
            point = cmd.get("point")
            if point not in POINTS:
                say("error", message=f"unknown point {point!r}; known: {sorted(POINTS)}")
                continue
            with self._lock:
                if cmd["cmd"] == "arm":
                    self.armed[point] = cmd["action"]
                    self.released[point] = threading.Event()
                    say("armed", point=point, action=cmd["action"])
                elif cmd["cmd"] == "release":
                    self.released.setdefault(point, threading.Event()).set()

    def hit(self, point: str, records: Any) -> None:
        if not records:
            return
        with self._lock:
            action = self.armed.pop(point, None)
            released = self.released.get(point)
        if action is None:
            return
        ids = [getattr(r, "id", None) for r in records]
        say("point", point=point, action=action, rows=len(ids), first_id=ids[0], last_id=ids[-1],
            partitions=sorted({getattr(r, "partition", -1) for r in records}))
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hold" and released is not None:
            released.wait()


def _records_in(args: tuple[Any, ...], result: Any = None) -> Any:
    for x in (result, *args):
        if isinstance(x, list) and x and hasattr(x[0], "partition") and hasattr(x[0], "message_id"):
            return x
    return None


def hooked_relay_class(points: Points) -> type[Relay]:
    attrs: dict[str, Callable[..., Any]] = {}
    by_method: dict[str, list[tuple[str, str]]] = {}
    for point, (method, when) in POINTS.items():
        by_method.setdefault(method, []).append((point, when))
    for method, hooks in by_method.items():
        original = getattr(Relay, method, None)
        if original is None:
            say("error", message=f"Relay.{method} does not exist any more: update POINTS in {__file__}")
            sys.exit(3)

        def wrapper(self: Relay, *args: Any, __orig: Any = original, __hooks: Any = hooks, **kw: Any) -> Any:
            for point, when in __hooks:
                if when == "before":
                    points.hit(point, _records_in(args))
            result = __orig(self, *args, **kw)
            for point, when in __hooks:
                if when == "after":
                    points.hit(point, _records_in(args, result))
            return result

        attrs[method] = wrapper

    def start(self: Relay) -> None:
        Relay.start(self)
        say("started", relay_id=self.relay_id, partitions=sorted(self.leases.held), pid=os.getpid())

    attrs["start"] = start
    return type("HookedRelay", (Relay,), attrs)


def main() -> int:
    argv = sys.argv[1:]
    own, relay_argv = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    p = argparse.ArgumentParser(prog="_relay_child")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--log-level", default="INFO")
    opts = p.parse_args(own)
    setup_logging(opts.log_level)

    args = build_parser().parse_args(["relay", *relay_argv])
    engine, publisher, config = build(args)
    if opts.set:
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        for item in opts.set:
            k, v = item.split("=", 1)
            values[k] = v
        config = RelayConfig.from_mapping(values)

    points = Points()
    threading.Thread(target=points.listen, daemon=True, name="control").start()
    relay = hooked_relay_class(points)(engine, publisher, config=config, tables=tables_from_args(args))

    def _stop(_signum: int, _frame: object) -> None:
        relay.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stats = relay.run()
    engine.dispose()
    say("exit", stats=stats.as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
