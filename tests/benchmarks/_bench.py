"""Shared plumbing of the benchmark scripts (not a test module: pytest never collects this folder).

Every script prints ``name: value`` lines through :func:`emit`, creates its own database with
:func:`bench_database` (dropped at the end) and, when it needs Kafka, starts a throwaway tansu
broker with :func:`kafka_broker` (or uses ``KAFKA_BOOTSTRAP_SERVERS``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from outbox import Outbox, migrations  # noqa: E402
from outbox.brokers.base import Outcome, PublishResult  # noqa: E402
from outbox.cli._common import settle_daemon_heap  # noqa: E402
from outbox.message import OutboxRecord, OutgoingMessage, partition_for  # noqa: E402
from outbox.schema import DUE_NOW, STATUS_PENDING, default_tables  # noqa: E402

PG_URL = os.environ.get("OUTBOX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("OUTBOX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
RABBITMQ_URL = os.environ.get("OUTBOX_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PAYLOAD_SIZE = 200
TOPIC = "bench"


# ------------------------------------------------------------------ output
def emit(name: str, value: object) -> None:
    """One measurement: ``name: value`` (floats rounded sensibly), flushed at once."""
    if isinstance(value, float):
        if abs(value) >= 100:
            text = f"{value:.0f}"
        elif abs(value) >= 1:
            text = f"{value:.2f}"
        else:
            text = f"{value:.3f}"
    else:
        text = str(value)
    print(f"{name}: {text}", flush=True)


def note(text: str) -> None:
    """Progress for humans, on stderr (stdout carries only measurements)."""
    print(f"# {text}", file=sys.stderr, flush=True)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ------------------------------------------------------------------ arguments
def parser(description: str, **sizes: int) -> argparse.ArgumentParser:
    """Common flags (--db, --quick, --kafka) plus one ``--NAME`` int flag per size (default given)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--db", choices=("postgresql", "mariadb"), default="postgresql")
    p.add_argument("--quick", action="store_true", help="about 10x smaller sizes, for a smoke run")
    p.add_argument("--kafka", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                   help="bootstrap servers (default: start tansu on a free port)")
    p.add_argument("--batch-size", type=int, default=1000, help="relay batch size")
    for name, default in sizes.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {default:,} ({max(1, default // 10):,} with --quick)")
    p.set_defaults(_sizes=sizes)
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = p.parse_args(argv)
    for name, default in args._sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, max(1, default // 10) if args.quick else default)
    return args


# ------------------------------------------------------------------ databases
def admin_url(db: str) -> str:
    return PG_URL if db == "postgresql" else MYSQL_URL


@contextlib.contextmanager
def bench_database(db: str, *, migrate: bool = True) -> Iterator[sa.Engine]:
    """A new database ``bench_<random>`` with the toolkit's tables, dropped at the end."""
    admin = make_url(admin_url(db))
    name = f"bench_{uuid.uuid4().hex[:10]}"
    eng_admin = sa.create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with eng_admin.connect() as conn:
        if db == "postgresql":
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        else:
            conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    url = admin.set(database=name)
    engine = sa.create_engine(url, pool_size=10, max_overflow=10)
    try:
        if migrate:
            migrations.upgrade(engine)
        yield engine
    finally:
        engine.dispose()
        with eng_admin.connect() as conn:
            if db == "postgresql":
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        eng_admin.dispose()


def url_of(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def pending_count(engine: sa.Engine) -> int:
    o = default_tables().outbox
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(o)).scalar_one())


def vacuum(engine: sa.Engine) -> None:
    """Fresh statistics and no dead tuples before a timed drain (fair between repeated fills)."""
    names = [t.name for t in default_tables().all()]
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for n in names:
                conn.execute(sa.text(f'VACUUM (ANALYZE) "{n}"'))
    else:
        with engine.connect() as conn:
            for n in names:
                conn.execute(sa.text(f"ANALYZE TABLE `{n}`")).all()


def payload_bytes(i: int, size: int = PAYLOAD_SIZE) -> bytes:
    head = f"{i:012d}|".encode()
    return head + b"x" * max(0, size - len(head))


def key_of(i: int, keys: int) -> str:
    return f"key-{i % keys:05d}"


def fill_backlog(engine: sa.Engine, n: int, *, keys: int = 1000, topic: str = TOPIC, chunk: int = 10_000,
                 method: str = "add_many", size: int = PAYLOAD_SIZE) -> float:
    """Write ``n`` pending messages over ``keys`` keys; returns the seconds it took (vacuum excluded).

    ``add_many``: ``Outbox.add_many`` in one transaction per ``chunk`` rows (the writer's real path).
    ``server`` (PostgreSQL only): one ``INSERT ... SELECT generate_series`` per chunk, built with
    SQLAlchemy Core on the outbox table; same columns, partitions computed like the writer does.
    """
    outbox = Outbox()
    t0 = time.perf_counter()
    if method == "server":
        if engine.dialect.name != "postgresql":
            raise SystemExit("--fill server needs PostgreSQL")
        _fill_server(engine, n, keys=keys, topic=topic, chunk=chunk * 10, size=size, partitions=outbox.partitions)
    else:
        done = 0
        while done < n:
            m = min(chunk, n - done)
            msgs = [OutgoingMessage(topic, payload_bytes(done + j, size), key=key_of(done + j, keys))
                    for j in range(m)]
            with Session(engine) as s, s.begin():
                outbox.add_many(s, msgs)
            done += m
    took = time.perf_counter() - t0
    vacuum(engine)
    return took


def _fill_server(engine: sa.Engine, n: int, *, keys: int, topic: str, chunk: int, size: int,
                 partitions: int) -> None:

    o = default_tables().outbox
    key_names = [key_of(k, keys) for k in range(keys)]
    parts = [zlib.crc32(k.encode()) % partitions for k in key_names]
    assert parts == [partition_for(k, uuid.UUID(int=0), partitions) for k in key_names]
    filler = b"x" * (size - 13)
    now = dt.datetime.now(dt.timezone.utc)
    g = sa.func.generate_series(sa.bindparam("lo", type_=sa.BigInteger), sa.bindparam("hi", type_=sa.BigInteger)
                                ).table_valued("i").render_derived(name="g")
    kp = sa.values(sa.column("k", sa.Integer), sa.column("key", sa.Text), sa.column("part", sa.Integer),
                   name="kp").data([(i, k, p) for i, (k, p) in enumerate(zip(key_names, parts, strict=True))])
    sel = sa.select(
        sa.func.gen_random_uuid(),
        sa.literal(topic),
        kp.c.key,
        sa.func.convert_to(sa.func.lpad(sa.cast(g.c.i, sa.Text), 12, "0").op("||")("|"), "UTF8").op("||")(
            sa.bindparam("filler", type_=sa.LargeBinary())),
        sa.literal("application/octet-stream"),
        kp.c.part,
        sa.bindparam("now", type_=o.c.created_at.type),
        sa.bindparam("due", type_=o.c.available_at.type),
        sa.literal(0),
        sa.literal(STATUS_PENDING),
    ).select_from(g.join(kp, kp.c.k == g.c.i % keys)).order_by(g.c.i)
    stmt = o.insert().from_select(
        ["message_id", "topic", "key", "payload", "content_type", "partition", "created_at", "available_at",
         "attempts", "status"], sel)
    done = 0
    while done < n:
        m = min(chunk, n - done)
        with engine.begin() as conn:
            conn.execute(stmt, {"lo": done, "hi": done + m - 1, "filler": filler, "now": now, "due": DUE_NOW})
        done += m


# ------------------------------------------------------------------ raw baselines
#: the columns a relay needs to publish a row (what the raw loop reads, so it moves the same bytes)
RAW_COLUMNS = ("id", "message_id", "topic", "key", "payload", "headers", "content_type", "partition", "attempts",
               "created_at")


def raw_claim_delete(engine: sa.Engine, batch_size: int = 1000) -> tuple[int, float]:
    """The tightest honest claim+delete loop, on the driver directly (no SQLAlchemy, no toolkit code).

    Per batch: ``SELECT <the relay's columns> ... WHERE status = 'pending' ORDER BY id LIMIT n FOR
    UPDATE SKIP LOCKED``, ``DELETE ... WHERE id = ANY(ids)`` (an ``IN`` list on MariaDB), ``COMMIT``.
    No leases, no ordering checks, no per-row work: the database's own floor for a relay. Returns
    (rows deleted, seconds).
    """
    raw = engine.raw_connection()
    pg = engine.dialect.name == "postgresql"
    quote = engine.dialect.identifier_preparer.quote  # where needed: KEY and PARTITION are reserved on MariaDB
    table = quote(default_tables().outbox.name)
    # created_at as the relay reads it on MariaDB: microseconds since 1970, an integer pymysql takes
    # with one int() instead of parsing a DATETIME in Python (the loop stays the tightest one)
    columns = ", ".join("TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', created_at)"
                        if c == "created_at" and engine.dialect.name in ("mysql", "mariadb") else quote(c)
                        for c in RAW_COLUMNS)
    select = (f"SELECT {columns} FROM {table} "
              f"WHERE status = 'pending' ORDER BY id LIMIT {int(batch_size)} FOR UPDATE SKIP LOCKED")
    try:
        cur = raw.cursor()
        n = 0
        with frozen_heap():  # as the relay's side is timed
            t0 = time.perf_counter()
            while True:
                cur.execute(select)
                ids = [r[0] for r in cur.fetchall()]
                if not ids:
                    raw.commit()
                    break
                if pg:
                    cur.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", (ids,))
                else:
                    cur.execute(f"DELETE FROM {table} WHERE id IN ({','.join(['%s'] * len(ids))})", ids)
                raw.commit()
                n += len(ids)
            took = time.perf_counter() - t0
    finally:
        raw.close()
    return n, took


# ------------------------------------------------------------------ the daemons' heap
@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Run the block with the heap as the daemons run their loop, then put it back.

    ``outbox relay`` and ``outbox consume`` call :func:`outbox.cli._common.settle_daemon_heap` once
    start-up is done: ``gc.freeze()`` (full collections no longer walk the modules and compiled
    statements: 2.8-4.2 us a relayed message otherwise) and a young-generation threshold of 10,000
    (1.3-2.3 us a message to Kafka at the default 700). A benchmark timing the toolkit in its own
    process wraps the timed part in this, and its raw baseline too, so both sides collect alike.
    """
    threshold = gc.get_threshold()
    gc.collect()
    settle_daemon_heap()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


# ------------------------------------------------------------------ publishers
class NullPublisher:
    """A Publisher that delivers everything instantly and keeps nothing (flat memory)."""

    def start(self) -> None:
        return None

    def publish(self, records: Sequence[OutboxRecord], *, timeout: float = 30.0) -> list[PublishResult]:
        return [PublishResult(r.id, Outcome.DELIVERED) for r in records]

    def flush(self, timeout: float = 30.0) -> None:
        return None

    def close(self, timeout: float = 10.0) -> None:
        return None


@contextlib.contextmanager
def kafka_broker(bootstrap: str | None) -> Iterator[str]:
    """``bootstrap`` when given, else a fresh in-memory tansu broker for the duration."""
    if bootstrap:
        yield bootstrap
        return
    from outbox.devbroker import DevKafkaBroker

    log = Path(tempfile.gettempdir()) / f"bench-tansu-{os.getpid()}.log"
    with DevKafkaBroker(log_path=str(log)) as broker:
        yield broker.bootstrap_servers


def create_topic(bootstrap: str, partitions: int = 4, prefix: str = "bench") -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        fut.result(30)
    return name


def kafka_producer_conf(bootstrap: str) -> dict[str, object]:
    """The settings KafkaPublisher uses by default (idempotent, acks=all, lz4, linger 5 ms)."""
    return {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.timeout.ms": 20_000,
        "partitioner": "murmur2_random",
    }


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 120.0) -> list[tuple[int, str, str]]:
    """Every message of ``topic`` as (kafka partition, key, message-id header), per partition in order.

    Uses ``assign()`` (no group join). Stops at ``expected`` messages or at the deadline.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-read-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "enable.partition.eof": False})
    md = c.list_topics(topic, timeout=10)
    parts = sorted(md.topics[topic].partitions)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[tuple[int, str, str]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for m in c.consume(10_000, 0.5):
                if m.error():
                    continue
                mid = dict(m.headers() or []).get("message-id", b"").decode()
                out.append((m.partition(), (m.key() or b"").decode(), mid))
    finally:
        c.close()
    return out


# ------------------------------------------------------------------ relay subprocesses
CHILD = HERE / "_relay_child.py"


def relay_child(url: str, *, publisher: str = "null", bootstrap: str | None = None, mode: str = "drain",
                batch_size: int = 1000, notify: bool = False, poll_interval: float = 1.0,
                barrier: bool = False, published_log: str | None = None, timeline: int = 0) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(CHILD), "--url", url, "--publisher", publisher, "--mode", mode,
           "--batch-size", str(batch_size), "--poll-interval", str(poll_interval)]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    if notify:
        cmd.append("--notify")
    if barrier:
        cmd.append("--barrier")
    if published_log:
        cmd += ["--published-log", published_log]
    if timeline:
        cmd += ["--timeline", str(timeline)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def child_line(proc: subprocess.Popen[str], expect: str, timeout: float = 120.0) -> dict[str, object]:
    """Read the child's next JSON line (``{"event": expect, ...}``)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"relay child exited (code {proc.wait(timeout)}) before {expect!r}")
    data = json.loads(line)
    if data.get("event") != expect:
        raise RuntimeError(f"relay child said {data!r}, expected {expect!r}")
    return data


def stop_relay_child(proc: subprocess.Popen[str], published_log: Path | None = None) -> dict[str, float]:
    """SIGTERM a ``run``-mode relay child, wait for its ``done`` and its exit; then read (and remove)
    its ``--published-log``: message id -> the time it was acknowledged (empty without one)."""
    proc.send_signal(signal.SIGTERM)
    try:
        child_line(proc, "done", timeout=30)
    finally:
        proc.wait(30)
    if published_log is None or not published_log.exists():
        return {}
    acked: dict[str, float] = json.loads(published_log.read_text())
    published_log.unlink(missing_ok=True)
    return acked


def send(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


# ------------------------------------------------------------------ machine
def machine_lines() -> list[tuple[str, object]]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    lines: list[tuple[str, object]] = [
        ("machine_date", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("machine_cores", os.cpu_count() or 0),
        ("machine_cpu", cpu),
        ("machine_python", platform.python_version()),
        ("machine_sqlalchemy", sa.__version__),
    ]
    with contextlib.suppress(Exception):
        import confluent_kafka

        v = confluent_kafka.version()
        lines.append(("machine_confluent_kafka", f"{v[0] if isinstance(v, tuple) else v} (librdkafka "
                                                 f"{confluent_kafka.libversion()[0]})"))
    for label, url, q in (("postgresql", PG_URL, "SHOW server_version"), ("mariadb", MYSQL_URL, "SELECT VERSION()")):
        try:
            e = sa.create_engine(url, poolclass=sa.pool.NullPool)
            with e.connect() as conn:
                lines.append((f"machine_{label}", conn.execute(sa.text(q)).scalar_one()))
            e.dispose()
        except Exception as exc:
            lines.append((f"machine_{label}", f"unavailable ({type(exc).__name__})"))
    try:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        props = conn._impl.server_properties  # type: ignore[attr-defined]
        lines.append(("machine_rabbitmq", props.get("version", b"?").decode()
                      if isinstance(props.get("version"), bytes) else props.get("version")))
        conn.close()
    except Exception as exc:
        lines.append(("machine_rabbitmq", f"unavailable ({type(exc).__name__})"))
    return lines


# ------------------------------------------------------------------ profiling
@contextlib.contextmanager
def profiled(path: str | None, *, rate: int = 200) -> Iterator[None]:
    """Sample this process with py-spy (``pip install py-spy``) while the block runs.

    Writes collapsed stacks (``--format raw``, one ``frame;frame;... count`` line per stack) to
    ``path``; summarise them with ``python tests/benchmarks/profile_summary.py PATH``. ``--idle`` is
    on, so waits (for the database, for broker acks) count too: percentages are of wall time, and
    time inside librdkafka / libpq shows up under the Python frame that called it.
    """
    if not path:
        yield
        return
    import shutil
    import signal

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    proc = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", str(rate),
                             "--threads", "--idle", "--output", path, "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let py-spy attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
