"""Run every benchmark scenario, one process each, and print their ``name: value`` lines.

    python tests/benchmarks/run_all.py [--quick] [--db postgresql|mariadb] [--only relay_kafka,writer]

The machine (cores, CPU, Python and database versions, date) is printed first. Progress notes go
to stderr; stdout carries only ``name: value`` lines. Exits non-zero if a scenario failed (its
check failed or it crashed); the other scenarios still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b

SCENARIOS = ["relay_kafka", "relay_kafka_1k", "relay_kafka_mariadb", "relay_kafka_metrics", "relay_rabbitmq",
             "latency", "idle_latency", "writer", "consumer", "consumer_v7", "async_consumer", "backlog_scale",
             "backlog_scale_mariadb", "relays", "async_runner", "retention"]

#: scenarios that are another script's mode: name -> (script, its flags, whether run_all renames its lines).
#: A renamed scenario's lines are the script's with its name put in front (``relay_kafka_msgs_per_s`` ->
#: ``relay_kafka_1k_msgs_per_s``, ``baseline_raw_produce_msgs_per_s`` ->
#: ``relay_kafka_1k_baseline_raw_produce_msgs_per_s``), so no two scenarios print the same name.
#: A ``--db`` among the flags overrides run_all's own: P1 and P6 name MariaDB too.
EXTRA: dict[str, tuple[str, list[str], bool]] = {
    "relay_kafka_1k": ("relay_kafka", ["--size", "1024"], True),
    "relay_kafka_mariadb": ("relay_kafka", ["--db", "mariadb"], True),
    "relay_kafka_metrics": ("relay_kafka", ["--metrics"], False),  # prints relay_kafka_metrics_* itself
    "consumer_v7": ("consumer", ["--ids", "v7"], False),  # prints consumer_v7_* itself
    "backlog_scale_mariadb": ("backlog_scale", ["--db", "mariadb"], True),
}


def renamed(line: str, script: str, scenario: str) -> str:
    """``line`` of ``script``'s output as ``scenario``'s: its name prefixed, anything else untouched."""
    name, sep, value = line.partition(": ")
    if not sep or not name or " " in name:
        return line
    name = scenario + name[len(script):] if name.startswith(script + "_") else f"{scenario}_{name}"
    return f"{name}{sep}{value}"


def run(cmd: list[str], script: str, scenario: str, rename: bool) -> int:
    """Run one scenario's process; its stdout passes through (renamed if asked), its stderr untouched."""
    if not rename:
        return subprocess.call(cmd)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1) as child:
        assert child.stdout is not None
        for line in child.stdout:
            print(renamed(line.rstrip("\n"), script, scenario), flush=True)
    return child.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--db", choices=("postgresql", "mariadb"), default="postgresql")
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    p.add_argument("--kafka", help="bootstrap servers (default: each script starts its own tansu)")
    args = p.parse_args()
    chosen = args.only.split(",") if args.only else SCENARIOS
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    for name, value in b.machine_lines():
        b.emit(name, value)
    failed = []
    for name in chosen:
        script, extra, rename = EXTRA.get(name, (name, [], False))
        cmd = [sys.executable, str(b.HERE / f"bench_{script}.py"), "--db", args.db, *extra]
        if args.quick:
            cmd.append("--quick")
        if args.kafka:
            cmd += ["--kafka", args.kafka]
        b.note(f"running {name}")
        t0 = time.monotonic()
        rc = run(cmd, script, name, rename)
        b.emit(f"{name}_wall_s", time.monotonic() - t0)
        if rc:
            failed.append(name)
            b.emit(f"{name}_failed_exit_code", rc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
