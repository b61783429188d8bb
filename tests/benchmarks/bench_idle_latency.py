"""What the relay adds to latency when it is nearly idle (issue 14, part 4), without a broker.

One writer commits one message per transaction at ``--rate`` (default 50 msg/s, a relay that waits
for work between messages) with ``Outbox(notify=True)``. Each message is stamped when it is taken
out of the outbox, right after the DELETE and before the COMMIT, by one of two processes, in
alternating phases of ``--seconds`` each (``--runs`` of each, default 3):

- **raw**: the tightest loop that does the same work on psycopg directly (no SQLAlchemy, no
  toolkit code): LISTEN on the outbox's channel; at each notification ``SELECT ... ORDER BY id
  LIMIT 1000 FOR UPDATE SKIP LOCKED``, ``DELETE ... WHERE id = ANY(...)``, stamp, ``COMMIT``, until
  a claim finds nothing. No leases, no ordering, no per-row work;
- **relay**: ``Relay.run`` with the null publisher and ``notify=True`` (what ``outbox relay
  --notify`` does, less the broker), stamped by ``on_published``.

Latency is the stamp minus the time the writer's commit returned (one clock). It prints the p50
and p99 of each side (medians over the runs) and what the relay adds over the raw loop. The
broker's share (produce to receive) is ``bench_latency.py``'s floor; this script is the relay's
own. PostgreSQL only (NOTIFY).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as b
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox
from outbox.schema import default_tables

WARM_S = 1.0


def _raw_loop(url: str, ready: Any, stop: Any, out: Any) -> None:
    """The raw side, in a process of its own (as the relay is): see the module docstring."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conninfo = {"host": u.host, "port": u.port, "user": u.username, "password": u.password, "dbname": u.database}
    conninfo = {k: v for k, v in conninfo.items() if v is not None}
    table = default_tables().outbox.name
    listen = psycopg.connect(autocommit=True, **conninfo)
    listen.execute(f'LISTEN "{table}"')
    work = psycopg.connect(**conninfo)
    select = (f'SELECT id, message_id FROM "{table}" WHERE status = \'pending\' ORDER BY id LIMIT 1000 '
              "FOR UPDATE SKIP LOCKED")
    delete = f'DELETE FROM "{table}" WHERE id = ANY(%s)'
    stamps: dict[str, float] = {}
    ready.set()
    while not stop.is_set():
        for _ in listen.notifies(timeout=0.2, stop_after=1):
            pass
        while True:
            rows = work.execute(select).fetchall()
            if not rows:
                work.commit()
                break
            work.execute(delete, ([r[0] for r in rows],))
            now = time.time()
            for r in rows:
                stamps[str(r[1])] = now
            work.commit()
    listen.close()
    work.close()
    out.put(stamps)


def write(engine: sa.Engine, rate: float, seconds: float) -> dict[str, float]:
    """Commit one message every ``1/rate`` s for ``WARM_S + seconds``; message id -> commit-return time
    of those after the first ``WARM_S``."""
    box = Outbox(notify=True)
    committed: dict[str, float] = {}
    n = int(rate * (WARM_S + seconds))
    t0 = time.time()
    for i in range(n):
        delay = t0 + i / rate - time.time()
        if delay > 0:
            time.sleep(delay)
        with Session(engine) as s, s.begin():
            mid = box.add(s, b.TOPIC, b.payload_bytes(i), key=b.key_of(i, 100))
        if i >= rate * WARM_S:
            committed[str(mid)] = time.time()
    return committed


def raw_phase(engine: sa.Engine, args: Any) -> tuple[dict[str, float], dict[str, float]]:
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_raw_loop, args=(b.url_of(engine), ready, stop, out))
    proc.start()
    if not ready.wait(60):
        raise RuntimeError("the raw loop did not start")
    committed = write(engine, args.rate, args.seconds)
    wait_drained(engine)
    stop.set()
    stamps = out.get(timeout=60)
    proc.join(30)
    return committed, stamps


def relay_phase(engine: sa.Engine, args: Any) -> tuple[dict[str, float], dict[str, float]]:
    log = Path(tempfile.gettempdir()) / f"bench-idle-{uuid.uuid4().hex[:8]}.json"
    child = b.relay_child(b.url_of(engine), publisher="null", mode="run", notify=True, published_log=str(log),
                          poll_interval=args.poll_interval)
    committed: dict[str, float] = {}
    try:
        b.child_line(child, "ready")
        committed = write(engine, args.rate, args.seconds)
        wait_drained(engine)
    finally:
        stamps = b.stop_relay_child(child, log)
    return committed, stamps


def wait_drained(engine: sa.Engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while b.pending_count(engine) and time.monotonic() < deadline:
        time.sleep(0.05)  # the other process's progress, seen through the table: nothing to await


def figures(committed: dict[str, float], stamps: dict[str, float]) -> dict[str, float]:
    lat = sorted((stamps[m] - t) * 1000 for m, t in committed.items() if m in stamps)
    if not lat:
        return {"p50": float("nan"), "p99": float("nan"), "missing": len(committed)}
    return {"p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))],
            "missing": len(committed) - len(lat)}


def main() -> None:
    p = b.parser(__doc__ or "", seconds=10)
    p.add_argument("--rate", type=float, default=50.0, help="messages committed per second (one per transaction)")
    p.add_argument("--runs", type=int, default=3, help="phases of each side, alternating; medians are reported")
    p.add_argument("--poll-interval", type=float, default=1.0, help="the relay's poll_interval (its safety net)")
    args = b.parse(p)
    if args.quick:
        args.runs = 1
    if args.db != "postgresql":
        b.note("the idle-latency scenario needs NOTIFY: PostgreSQL only; nothing measured")
        return
    got: dict[str, list[dict[str, float]]] = {"raw": [], "relay": []}
    with b.bench_database(args.db) as engine:
        for run in range(args.runs):
            order = ["raw", "relay"] if run % 2 == 0 else ["relay", "raw"]
            for side in order:
                b.note(f"idle latency run {run + 1}/{args.runs}: {side}")
                committed, stamps = (raw_phase if side == "raw" else relay_phase)(engine, args)
                f = figures(committed, stamps)
                got[side].append(f)
                b.emit(f"idle_latency_run{run + 1}_{side}_p50_ms", f["p50"])
                b.emit(f"idle_latency_run{run + 1}_{side}_p99_ms", f["p99"])
    b.emit("idle_latency_rate_msgs_per_s", args.rate)
    b.emit("idle_latency_runs", args.runs)
    for q in ("p50", "p99"):
        raw = statistics.median(r[q] for r in got["raw"])
        relay = statistics.median(r[q] for r in got["relay"])
        b.emit(f"baseline_idle_latency_raw_listen_claim_delete_{q}_ms", raw)
        b.emit(f"idle_latency_relay_{q}_ms", relay)
        b.emit(f"idle_latency_relay_added_over_raw_{q}_ms", relay - raw)
        b.emit(f"idle_latency_relay_vs_raw_{q}_ratio", b.ratio(relay, raw))
    for side in ("raw", "relay"):
        b.emit(f"idle_latency_{side}_missing", sum(r["missing"] for r in got[side]))


if __name__ == "__main__":
    main()
