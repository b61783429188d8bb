"""What every fault case is made of: relay children, broker targets, writing, draining, reading back.

- :class:`RelayChild`: one relay process (``_relay_child.py``) with fault points it can be asked to
  stop, kill or hold at, SIGSTOP/SIGCONT/SIGKILL/SIGTERM, its log in a file;
- :class:`KafkaTarget` / :class:`RabbitTarget`: a fresh topic (one sentinel record first in every
  Kafka partition, see below) or exchange + queue per case, and a FRESH reader used only after
  every relay has stopped, so the counts are final;
- :class:`OwnTansu`: a Kafka-protocol broker of the case's own (restartable on the same port,
  advertising a proxy in front of it when asked);
- :class:`Case`: writes N messages over K keys, waits for the drain (event-driven: no pending row
  left; fails early when no relay is alive or nothing moved for ``stall`` seconds), stops the
  relays and turns what was read into a :class:`Result`.

tansu (the test broker, memory storage) can lose a partition's very first record; so each Kafka
partition gets a sentinel record before the relays start, and the reader skips sentinels.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import Outbox, OutgoingMessage, default_tables
from outbox.devbroker import find_tansu, free_port

TABLES = default_tables()
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHILD = HERE / "_relay_child.py"


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def via(url: str, port: int) -> str:
    """``url`` with its host:port replaced by 127.0.0.1:``port`` (a proxy in front of it)."""
    if url.startswith("amqp"):
        scheme, rest = url.split("://", 1)
        creds, tail = rest.rsplit("@", 1) if "@" in rest else ("", rest)
        path = tail.split("/", 1)[1] if "/" in tail else ""
        return f"{scheme}://{creds + '@' if creds else ''}127.0.0.1:{port}/{path}"
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def port_of(url: str) -> int:
    if url.startswith("amqp"):
        tail = url.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
        return int(tail.rsplit(":", 1)[1]) if ":" in tail else 5672
    u = make_url(url)
    return int(u.port or {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}[u.get_backend_name()])


# ------------------------------------------------------------------ relay children


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class RelayChild:
    """A relay process with armable fault points (see ``_relay_child.py``)."""

    def __init__(self, name: str, relay_args: list[str], log_path: Path, sets: Iterable[str] = ()) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, str(CHILD)]
        for s in sets:
            cmd += ["--set", s]
        cmd += ["--", *relay_args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=_env(), cwd=str(REPO), text=True, bufsize=1)
        self.events: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True, name=f"{name}-events").start()
        self.stopped = False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def arm(self, point: str, action: str) -> None:
        n = len(self.events_named("armed"))
        self.send(cmd="arm", point=point, action=action)
        self.wait_event(lambda e: e["event"] == "armed", 30, f"{self.name} to arm {point}", after=n)

    def release(self, point: str) -> None:
        self.send(cmd="release", point=point)

    def events_named(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["event"] == name]

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                   after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in [e for e in self.events if e["event"] == "error"]:
                    raise AssertionError(f"relay {self.name}: {e['message']}")
                matches = [e for e in self.events if pred(e)]
                if len(matches) > after:
                    return matches[after]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not matches[after:]):
                    raise AssertionError(f"relay {self.name}: no event for {what} within {timeout:g} s "
                                         f"(exit code {self.proc.poll()}); log tail:\n{self.log()[-3000:]}")
                self._cond.wait(min(left, 0.2))

    def wait_point(self, point: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_event(lambda e: e["event"] == "point" and e["point"] == point, timeout, f"point {point}")

    def wait_started(self, timeout: float = 60) -> dict[str, Any]:
        return self.wait_event(lambda e: e["event"] == "started", timeout, "start")

    def wait_stopped_by_signal(self, timeout: float = 10) -> None:
        """After a ``stop`` action: wait until the kernel shows the process as stopped (state T)."""
        wait_until(lambda: _proc_state(self.proc.pid) in ("T", "t"), timeout, f"{self.name} to be stopped")
        self.stopped = True

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 60) -> int | None:
        """SIGTERM (after SIGCONT if stopped) and wait for the exit code; SIGKILL if it hangs."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(Exception):
            self._log.close()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


# ------------------------------------------------------------------ brokers


class OwnTansu:
    """A tansu of this case's own on ``port``, advertising ``advertised_port`` (a proxy) if given."""

    def __init__(self, log_path: Path, port: int | None = None, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self) -> OwnTansu:
        out = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [find_tansu(), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        out.close()

        def listening() -> bool:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise AssertionError(f"tansu exited with {self._proc.returncode} (port {self.port} busy?)")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(listening, 30, f"tansu on port {self.port}")
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()  # a crash, not a clean shutdown; memory storage loses everything either way
            proc.wait(10)


class KafkaTarget:
    kind = "kafka"

    def __init__(self, bootstrap: str, partitions: int = 3) -> None:
        self.bootstrap = bootstrap
        self.topic = f"faults-{uuid.uuid4().hex[:10]}"
        self.partitions = partitions
        self.create()

    def create(self) -> None:
        """Create the topic and put one sentinel record first in each partition."""
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for fut in admin.create_topics([NewTopic(self.topic, num_partitions=self.partitions,
                                                 replication_factor=1)]).values():
            fut.result(30)
        producer = Producer({"bootstrap.servers": self.bootstrap, "log_level": 0})
        errors: list[Any] = []
        for p in range(self.partitions):
            producer.produce(self.topic, value=b'{"sentinel": true}', partition=p,
                             on_delivery=lambda err, _m: errors.append(err) if err else None)
        left = producer.flush(30)
        assert left == 0 and not errors, f"sentinels not acknowledged: {errors or left}"

    def relay_args(self, address: str | None = None) -> list[str]:
        return ["--kafka", address or self.bootstrap]

    def read_all(self, timeout: float = 60) -> list[tuple[str, int]]:
        """(key, seq) of every record, per partition in offset order, read up to the high watermarks."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        # read_committed (librdkafka's default, spelled out): should the relay produce in transactions,
        # what an aborted transaction carried does not count as delivered
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"faults-{uuid.uuid4().hex[:8]}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest", "log_level": 0,
                             "session.timeout.ms": 6000, "isolation.level": "read_committed"})
        try:
            def watermarks() -> dict[int, int]:
                return {p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=15, cached=False)[1]
                        for p in range(self.partitions)}

            assigned = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(self.partitions)]
            consumer.assign(assigned)
            nxt = dict.fromkeys(range(self.partitions), 0)
            got: list[tuple[str, int]] = []
            deadline = time.monotonic() + timeout
            high = watermarks()
            quiet = 0
            # tansu's watermarks can lag behind what a fetch returns: read until they are reached,
            # they did not move since, and a last poll brings nothing new
            while True:
                if time.monotonic() > deadline:
                    raise AssertionError(f"reader did not reach the high watermarks {high} (at {nxt})")
                msgs = consumer.consume(num_messages=1000, timeout=0.5)
                for msg in msgs:
                    if msg.error():
                        continue
                    nxt[msg.partition()] = max(nxt[msg.partition()], msg.offset() + 1)
                    body = json.loads(msg.value())
                    if "seq" in body:
                        got.append((body["key"], int(body["seq"])))
                # the position also moves past transaction markers, which are never returned as messages
                for tp in consumer.position([TopicPartition(self.topic, p) for p in range(self.partitions)]):
                    if tp.offset >= 0:
                        nxt[tp.partition] = max(nxt[tp.partition], tp.offset)
                if all(nxt[p] >= high[p] for p in high):
                    again = watermarks()
                    if again != high:
                        high = again
                        continue
                    quiet = quiet + 1 if not msgs else 0
                    if quiet >= 2:
                        break
            self.last_watermarks = high
            return got
        finally:
            consumer.close()


class RabbitTarget:
    kind = "rabbitmq"

    def __init__(self, url: str, names: dict[str, str]) -> None:
        import pika

        self.url = url
        self.exchange, self.queue = names["exchange"], names["queue"]
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            ch = conn.channel()
            ch.exchange_declare(self.exchange, "topic", durable=True)
            ch.queue_declare(self.queue, durable=True)
            ch.queue_bind(self.queue, self.exchange, "#")
        finally:
            conn.close()

    @property
    def topic(self) -> str:
        return self.exchange

    def relay_args(self, address: str | None = None) -> list[str]:
        return ["--rabbitmq", address or self.url]

    def read_all(self, timeout: float = 60) -> list[tuple[str, int]]:
        """(key, seq) of every message in the queue, in queue order (the relays have stopped)."""
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            ch = conn.channel()
            depth = ch.queue_declare(self.queue, passive=True, durable=True).method.message_count
            got: list[tuple[str, int]] = []
            deadline = time.monotonic() + timeout
            for method, _props, body in ch.consume(self.queue, auto_ack=True, inactivity_timeout=1.0):
                if method is None:
                    if len(got) >= depth or time.monotonic() > deadline:
                        break
                    continue
                b = json.loads(body)
                got.append((b["key"], int(b["seq"])))
                if len(got) >= depth:
                    break
            ch.cancel()
            assert len(got) >= depth, f"read {len(got)} of the {depth} messages in the queue"
            return got
        finally:
            with contextlib.suppress(Exception):
                conn.close()


# ------------------------------------------------------------------ one case


@dataclass
class Result:
    written: int
    delivered: int
    missing: int
    duplicates: int
    out_of_order: int
    dead: int
    dead_reasons: list[str]
    seconds: float
    batch: int
    faults: int
    copies: int = 0
    notes: list[str] = field(default_factory=list)
    missing_first: list[int] = field(default_factory=list)
    bad_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"written {self.written}, delivered {self.delivered}, missing {self.missing} "
                f"{self.missing_first[:10]}, duplicates {self.duplicates}, out of order {self.out_of_order} "
                f"{self.bad_keys[:5]}, dead {self.dead} {self.dead_reasons[:3]}, {self.seconds:.1f} s; "
                + "; ".join(self.notes))


def analyse(got: list[tuple[str, int]], expected: set[int]) -> tuple[int, int, int, list[int], list[str], int]:
    """delivered, duplicates, out-of-order keys, missing seqs, bad keys, copies."""
    seen: set[int] = set()
    firsts: dict[str, list[int]] = {}
    copies = 0
    for key, seq in got:
        if seq not in expected:
            continue
        copies += 1
        if seq in seen:
            continue
        seen.add(seq)
        firsts.setdefault(key, []).append(seq)
    bad = sorted(k for k, seqs in firsts.items() if any(b < a for a, b in itertools.pairwise(seqs)))
    missing = sorted(expected - seen)
    return len(seen), copies - len(seen), len(bad), missing, bad, copies


class Case:
    """One fault case on one database and one broker. Use as a context manager (relays cleaned up)."""

    def __init__(self, *, dialect: str, engine: sa.Engine, db_url: str, target: KafkaTarget | RabbitTarget,
                 tmp_path: Path, keys: int = 50, batch: int = 100) -> None:
        self.dialect, self.engine, self.db_url, self.target = dialect, engine, db_url, target
        self.tmp_path = tmp_path
        self.keys, self.batch = keys, batch
        self.relays: list[RelayChild] = []
        self.expected: set[int] = set()
        self.excluded: dict[int, str] = {}
        """seq -> why it is not expected at the broker (hand-corrupted rows)"""
        self.faults = 0
        self.notes: list[str] = []
        self.expectations: list[tuple[bool, str]] = []
        """case-specific (holds, what) checks, asserted after the common ones"""
        self._next = 0
        self.t0 = time.monotonic()
        self.box = Outbox()

    def __enter__(self) -> Case:
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self.relays:
            r.close()

    # ---------------------------------------------------------------- relays
    def relay(self, name: str, *, db_url: str | None = None, broker: str | None = None, ttl: float = 3,
              batch: int | None = None, poll: float = 0.2, extra: Iterable[str] = (), sets: Iterable[str] = (),
              defaults: bool = False) -> RelayChild:
        """Start a relay child. ``defaults=True``: only the database, the broker and the relay id."""
        args = ["--db", db_url or self.db_url, *self.target.relay_args(broker),
                "--relay-id", f"{name}-{uuid.uuid4().hex[:6]}"]
        if not defaults:
            args += ["--lease-ttl", str(ttl), "--batch-size", str(batch or self.batch), "--poll-interval", str(poll)]
        args += list(extra)
        r = RelayChild(name, args, self.tmp_path / f"{name}.log", sets)
        self.relays.append(r)
        return r

    def wait_balanced(self, n: int, timeout: float = 60) -> dict[str, int]:
        """Until ``n`` relays hold the partitions fairly (and nothing is unowned)."""
        le = TABLES.leases

        def balanced() -> dict[str, int] | None:
            with self.engine.connect() as c:
                owners = [o for (o,) in c.execute(sa.select(le.c.owner))]
            if not owners or None in owners:
                return None
            counts: dict[str, int] = {}
            for o in owners:
                counts[o] = counts.get(o, 0) + 1
            return counts if len(counts) == n and max(counts.values()) - min(counts.values()) <= 1 else None

        return wait_until(balanced, timeout, f"{n} relays to share the partitions")

    # ---------------------------------------------------------------- writing
    def key_of(self, seq: int) -> str:
        return f"k{seq % self.keys}"

    def write(self, n: int, per_txn: int = 500) -> list[int]:
        seqs = list(range(self._next, self._next + n))
        self._next += n
        for i in range(0, n, per_txn):
            chunk = seqs[i : i + per_txn]
            with Session(self.engine) as s, s.begin():
                self.box.add_many(s, [OutgoingMessage(self.target.topic, {"seq": q, "key": self.key_of(q)},
                                                      key=self.key_of(q), headers={"case": "faults"})
                                      for q in chunk])
        self.expected.update(seqs)
        return seqs

    def write_one(self, key: str) -> tuple[int, int]:
        """One message with its own key; returns (seq, row id)."""
        seq = self._next
        self._next += 1
        with Session(self.engine) as s, s.begin():
            self.box.add(s, self.target.topic, {"seq": seq, "key": key}, key=key)
        o = TABLES.outbox
        with self.engine.connect() as c:
            rid = c.execute(sa.select(sa.func.max(o.c.id))).scalar_one()
        self.expected.add(seq)
        return seq, int(rid)

    # ---------------------------------------------------------------- draining
    def pending(self) -> int:
        o = TABLES.outbox
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(o).where(o.c.status == "pending")).scalar_one())

    def wait_drained(self, timeout: float = 150, stall: float = 50) -> float:
        """Until no row is pending. Fails at once when no relay is alive, or after ``stall`` s without progress."""
        deadline = time.monotonic() + timeout
        last, moved = None, time.monotonic()
        while True:
            n = self.pending()
            now = time.monotonic()
            if n == 0:
                return now - self.t0
            if last is None or n < last:
                last, moved = n, now
            live = [r for r in self.relays if r.alive]
            why = None
            if not live:
                why = "every relay has exited"
            elif now - moved > stall:
                why = f"no progress for {stall:g} s"
            elif now > deadline:
                why = f"not drained within {timeout:g} s"
            if why:
                tails = "\n".join(f"--- {r.name} (exit {r.proc.poll()}):\n{r.log()[-2500:]}" for r in self.relays)
                raise AssertionError(f"{why}: {n} rows still pending;\n{tails}")
            time.sleep(0.1)

    def stop_relays(self) -> dict[str, int | None]:
        return {r.name: r.terminate() for r in self.relays}

    def dead_rows(self) -> list[tuple[int, str | None, str]]:
        o = TABLES.outbox
        with self.engine.connect() as c:
            return [(int(i), k, e or "") for i, k, e in c.execute(
                sa.select(o.c.id, o.c.key, o.c.last_error).where(o.c.status == "dead").order_by(o.c.id))]

    def result(self, *, drained_s: float, read_retries: int = 1) -> Result:
        """Stop every relay, then read everything back with a fresh reader (and once more if ids are missing)."""
        codes = self.stop_relays()
        bad_exits = {k: v for k, v in codes.items() if v not in (0, None, -signal.SIGKILL)}
        if bad_exits:
            self.notes.append(f"exit codes {bad_exits}")
        self.expectations.append((not bad_exits, f"every relay not SIGKILLed exits 0 on SIGTERM (got {codes})"))
        got = self.target.read_all()
        stats = analyse(got, self.expected)
        for _ in range(read_retries):  # tansu: a later reader may see records an earlier one missed
            if not stats[3]:
                break
            again = analyse(self.target.read_all(), self.expected)
            if len(again[3]) < len(stats[3]):
                stats = again
                self.notes.append("second reader saw more")
        delivered, dups, ooo, missing, bad, copies = stats
        dead = self.dead_rows()
        missing_not_dead = [q for q in missing if q not in self.excluded]
        return Result(written=len(self.expected), delivered=delivered, missing=len(missing_not_dead),
                      duplicates=dups, out_of_order=ooo, dead=len(dead), dead_reasons=[e[:120] for _, _, e in dead],
                      seconds=drained_s, batch=self.batch, faults=self.faults, copies=copies, notes=self.notes,
                      missing_first=missing_not_dead[:20], bad_keys=bad)
