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

SCENARIOS = ["relay_kafka", "relay_kafka_metrics", "relay_rabbitmq", "latency", "idle_latency", "writer", "consumer",
             "consumer_v7", "async_consumer", "backlog_scale", "relays", "async_runner", "retention"]

#: scenarios that are another script's mode: name -> (script, its flags)
EXTRA = {"relay_kafka_metrics": ("relay_kafka", ["--metrics"]), "consumer_v7": ("consumer", ["--ids", "v7"])}


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
        script, extra = EXTRA.get(name, (name, []))
        cmd = [sys.executable, str(b.HERE / f"bench_{script}.py"), "--db", args.db, *extra]
        if args.quick:
            cmd.append("--quick")
        if args.kafka:
            cmd += ["--kafka", args.kafka]
        b.note(f"running {name}")
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        b.emit(f"{name}_wall_s", time.monotonic() - t0)
        if rc:
            failed.append(name)
            b.emit(f"{name}_failed_exit_code", rc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
