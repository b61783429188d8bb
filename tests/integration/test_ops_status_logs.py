"""Issue 12 parts 3 and 4 on the real services: ``outbox status`` (blocked rows, --check, the JSON shape)
and the daemons' logs (JSON lines, no password, repeats rate-limited, progress and summary lines)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, default_tables
from outbox._logging import JsonFormatter, RateLimitFilter, log_context, set_process_context
from outbox.brokers.base import Outcome
from outbox.brokers.memory import MemoryPublisher
from outbox.cli import build_parser, main
from outbox.config import RelayConfig
from outbox.relay import Relay

T = default_tables()
REPO = Path(__file__).resolve().parents[2]
SECRET = "Pw-S3cret-9x7"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _with_password(url: str) -> str:
    return sa.engine.make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


# ---------------------------------------------------------------------------------------------- status

#: the documented top-level keys of `outbox status --json` (docs/operations.md, "status JSON")
STATUS_KEYS = {
    "pending", "due", "retrying", "blocked", "blocked_by", "blocked_by_topic", "waiting", "waiting_next_due_at",
    "delayed", "delayed_next_due_at", "dead", "published", "unknown_status", "oldest_pending_at",
    "oldest_pending_age_s", "relays", "relays_by_group", "partitions", "partition_owners", "unowned_partitions",
    "unowned_partitions_by_group", "layout", "archived", "archived_estimate", "published_estimate",
}
BLOCKER_KEYS = {"topic", "key", "blocking_id", "message_id", "blocking_status", "reason", "attempts", "retry_at",
                "blocking_created_at", "blocked", "waiting_since"}
RELAY_KEYS = {"relay_id", "hostname", "pid", "instance", "relay_group", "broker_kind", "broker_target", "topics",
              "started_at", "heartbeat_at", "expires_at", "alive", "lease_expired", "heartbeat_age_s"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def one_dead_blocking(engine: sa.Engine) -> dict[str, Any]:
    """Topic ``orders``: key ``a``'s first message is dead, two later ``a`` rows wait behind it; one row
    written with a delay; key ``b`` sent. A relay that ran once is registered."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add(s, "orders", {"n": 1}, key="a")
        box.add(s, "orders", {"n": 2}, key="b")
        box.add(s, "orders", {"n": 3}, key="a")
        box.add(s, "orders", {"n": 4}, key="a")
        box.add(s, "later", {"n": 5}, key="c", delay=3600)
    pub = MemoryPublisher()
    pub.fail(lambda r: r.key == "a", Outcome.FAILED, "MSG_SIZE_TOO_LARGE: 2,000,000 bytes")
    relay = Relay(engine, pub, config=RelayConfig(progress_interval=0))
    relay.start()
    relay.drain()
    relay.leases.register()  # keep the relay row (close() would remove it): status lists it
    with engine.connect() as c:
        dead = c.execute(sa.select(T.outbox.c.id, T.outbox.c.message_id)
                         .where(T.outbox.c.status == "dead")).one()
    yield {"dead_id": dead.id, "message_id": str(dead.message_id), "relay_id": relay.relay_id}
    relay.close()


def test_status_shows_the_dead_message_that_blocks_a_key(one_dead_blocking, db_url: str, capsys) -> None:
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--json")
    st = json.loads(out)
    assert code == 0 and set(st) == STATUS_KEYS, set(st) ^ STATUS_KEYS
    assert (st["pending"], st["blocked"], st["dead"], st["due"]) == (3, 2, 1, 0)
    assert (st["waiting"], st["delayed"]) == (1, 1) and st["waiting_next_due_at"] is not None
    assert (st["layout"], st["archived"], st["published"]) == ("plain", 0, 0)
    assert st["blocked_by_topic"] == {"orders": {"blocked": 2, "blockers": 1,
                                                 "waiting_since": st["blocked_by"][0]["waiting_since"]}}
    [b] = st["blocked_by"]
    assert set(b) == BLOCKER_KEYS
    assert (b["topic"], b["key"], b["blocking_id"], b["message_id"], b["blocking_status"], b["blocked"]) == (
        "orders", "a", one_dead_blocking["dead_id"], one_dead_blocking["message_id"], "dead", 2)
    assert "MSG_SIZE_TOO_LARGE" in b["reason"]
    [r] = st["relays"]
    assert set(r) == RELAY_KEYS and r["relay_id"] == one_dead_blocking["relay_id"]
    assert r["alive"] and not r["lease_expired"] and 0 <= r["heartbeat_age_s"] < 60
    assert st["relays_by_group"]["default"]["alive"] == 1

    code, out, _ = run_cli(capsys, "status", "--db", db_url)
    assert code == 0
    assert "topic 'orders': 2 row(s) behind 1 message(s)" in out
    assert f"behind row {one_dead_blocking['dead_id']}, dead" in out and "MSG_SIZE_TOO_LARGE" in out
    assert "not due yet:    1 (1 written with a delay" in out
    assert "group default: 1 alive, 0 expired, last heartbeat" in out


def test_status_check_exit_codes(one_dead_blocking, db_url: str, capsys) -> None:
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--check")
    assert code == 0 and out.startswith("OUTBOX OK - ") and "| pending=3 due=0 blocked=2 dead=1" in out
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--check", "--max-dead", "0")
    assert code == 2 and out.startswith("OUTBOX CRITICAL - dead 1 > 0") and len(out.splitlines()) == 1
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--check", "--max-dead", "1", "--max-blocked", "1")
    assert code == 2 and "blocked 2 > 1" in out and "dead" not in out.split("|")[0]
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--check", "--max-age", "1h", "--max-dead", "1",
                           "--max-blocked", "2")
    assert code == 0, out
    time.sleep(0.3)  # the oldest pending row must be older than the threshold (250 ms)
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--check", "--max-age", "250ms", "--json")
    check = json.loads(out)
    assert code == 2 and check["status"] == "CRITICAL" and check["code"] == 2
    assert check["problems"][0].startswith("oldest pending")
    # no live relay while rows are pending: WARNING
    one_dead_blocking_relay_gone(db_url)
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--check")
    assert code == 1 and out.startswith("OUTBOX WARNING - 3 pending and no live relay")


def one_dead_blocking_relay_gone(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    with engine.begin() as c:
        c.execute(T.relays.update().values(expires_at=_past()))
        c.execute(T.leases.update().values(expires_at=_past()))
    engine.dispose()


def _past() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)


def test_status_check_unknown_when_it_cannot_run(tmp_path, capsys) -> None:
    code, out, _ = run_cli(capsys, "status", "--db", f"sqlite:///{tmp_path}/none.db", "--check")
    assert code == 3 and out.startswith("OUTBOX UNKNOWN - no such database file")
    code, out, _ = run_cli(capsys, "status", "--db", f"postgresql://u:{SECRET}@127.0.0.1:1/x", "--check")
    assert code == 3 and out.startswith("OUTBOX UNKNOWN - ") and SECRET not in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--check", "--max-dead", "-1"])
    assert main(["status", "--check", "--max-dead", "many"]) == 3
    capsys.readouterr()


def test_docs_list_every_status_key() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    section = doc.split("## status JSON", 1)[1].split("\n## ", 1)[0]
    for key in STATUS_KEYS | BLOCKER_KEYS | RELAY_KEYS:
        assert f"`{key}`" in section, f"docs/operations.md, status JSON: {key} is not documented"


# ---------------------------------------------------------------------------------------------- logs (units)

def _record(msg: str, *args: Any, level: int = logging.ERROR, name: str = "x") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_rate_limit_counts_repeats_that_differ_only_in_numbers() -> None:
    now = [100.0]
    f = RateLimitFilter(30, clock=lambda: now[0])
    assert f.filter(_record("Connect to %s failed (after %dms)", "127.0.0.1:9", 3))
    shown = 0
    for i in range(311):
        now[0] += 0.05
        shown += f.filter(_record("Connect to %s failed (after %dms)", "127.0.0.1:9", i))
    assert shown == 0
    assert f.filter(_record("another error"))  # a distinct error is not held back
    assert f.filter(_record("progress %d", 1, level=logging.INFO)) and f.filter(_record("progress %d", 2,
                                                                                         level=logging.INFO))
    now[0] += 30
    rec = _record("Connect to %s failed (after %dms)", "127.0.0.1:9", 7)
    assert f.filter(rec)
    assert rec.getMessage().endswith("(repeated 311 times in 46 s)")


def test_json_formatter_masks_and_carries_the_context() -> None:
    fmt = JsonFormatter()
    try:
        raise ValueError(f"postgresql://app:{SECRET}@db/x")
    except ValueError:
        rec = logging.LogRecord("outbox.relay", logging.ERROR, __file__, 1, "db %s", (f"mysql://u:{SECRET}@h/d",),
                                sys.exc_info())
    from outbox._logging import ContextFilter

    with log_context(relay_id="r-1"):
        ContextFilter().filter(rec)
    line = fmt.format(rec)
    obj = json.loads(line)
    assert SECRET not in line and obj["relay_id"] == "r-1" and "Traceback" in obj["exc"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"]) and obj["level"] == "ERROR"
    set_process_context()  # nothing set: no leak into other tests


def test_log_options_before_or_after_the_sub_command(monkeypatch, tmp_path, capsys) -> None:
    p = build_parser()
    for argv in (["--log-format", "json", "--log-level", "debug", "status"],
                 ["status", "--log-format", "json", "--log-level", "debug"]):
        a = p.parse_args(argv)
        assert (a.log_format, a.log_level) == ("json", "DEBUG")
    with pytest.raises(SystemExit) as exc:
        main(["status", "--log-format", "yaml"])
    assert exc.value.code == 2
    assert "'yaml' is not a log format: use one of text, json" in capsys.readouterr().err
    monkeypatch.setenv("OUTBOX_LOG_FORMAT", "json")
    assert main(["status", "--db", f"sqlite:///{tmp_path}/none.db"]) == 2
    line = json.loads(capsys.readouterr().err.strip())
    assert line["level"] == "ERROR" and "no such database file" in line["message"]


def test_pika_is_quiet_at_the_default_level() -> None:
    from outbox.cli import setup_logging

    setup_logging("INFO")
    assert not logging.getLogger("pika").isEnabledFor(logging.INFO)
    assert logging.getLogger("outbox.relay").isEnabledFor(logging.INFO)
    setup_logging("DEBUG")
    assert logging.getLogger("pika").isEnabledFor(logging.DEBUG)
    setup_logging("INFO")


def test_broken_pipe_exits_quietly(tmp_path) -> None:
    db = f"sqlite:///{tmp_path}/o.db"
    assert subprocess.run([sys.executable, "-m", "outbox", "db", "upgrade", "--db", db], env=_env(),
                          capture_output=True, timeout=60).returncode == 0
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes
    done = subprocess.run([sys.executable, "-m", "outbox", "status", "--db", db], stdout=w, stderr=subprocess.PIPE,
                          env=_env(), timeout=60)
    os.close(w)
    assert done.returncode == 141 and done.stderr == b""


# ---------------------------------------------------------------------------------------------- logs (daemons)

def _write_rows(engine: sa.Engine, topic: str, n: int) -> None:
    box = Outbox()
    with Session(engine) as s, s.begin():
        for i in range(n):
            box.add(s, topic, {"i": i}, key=f"k{i % 7}")


def _pending(engine: sa.Engine, topic: str) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(T.outbox)
                             .where(T.outbox.c.topic == topic, T.outbox.c.status == "pending")).scalar_one())


def _wait(cond: Any, timeout: float, what: str, proc: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _daemon(args: list[str], log: Path, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "outbox", *args], stdout=fh, stderr=fh,
                            stdin=subprocess.DEVNULL, env=_env(), cwd=str(cwd))


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


CONSUMER_MODULE = '''
from consumers import DedupConsumer


class Sink(DedupConsumer):
    name = "logs.sink"

    def handle(self, session, message):
        return None
'''


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_relay_and_consume_json_logs_on_kafka_without_the_password(engine, db_url, kafka_bootstrap, kafka_topic,
                                                                  tmp_path) -> None:
    url = _with_password(db_url)  # PostgreSQL trusts the test user: any password connects
    n = 300
    _write_rows(engine, kafka_topic, n)
    log = tmp_path / "relay.log"
    relay = _daemon(["--log-format", "json", "relay", "--db", url, "--kafka", kafka_bootstrap,
                     "-X", f"sasl.password={SECRET}", "--topic", kafka_topic, "--progress-interval", "0.5"], log)
    try:
        _wait(lambda: _pending(engine, kafka_topic) == 0, 90, "relay drain", relay, log)
        time.sleep(1)  # one more round, so the progress line after the drain is written
    finally:
        assert _stop(relay) == 0
    text = log.read_text()
    lines = _json_lines(text)
    assert SECRET not in text
    assert all({"ts", "level", "logger", "message"} <= set(o) for o in lines)
    relay_lines = [o for o in lines if o["logger"] == "outbox.relay" and "relay_id" in o]
    assert relay_lines and all(o["relay_id"] == relay_lines[0]["relay_id"] for o in relay_lines)
    assert any(re.search(r"published \d+ \(\+\d+ in [\d.]+ s busy: \d+ msg/s\)", o["message"]) for o in lines)
    assert any(o["message"].startswith(f"relay {relay_lines[0]['relay_id']} stopping: published {n}")
               for o in lines), text[-2000:]

    (tmp_path / "sinkmod.py").write_text(CONSUMER_MODULE)
    log = tmp_path / "consume.log"
    group = f"g-{uuid.uuid4().hex[:8]}"
    consume = _daemon(["consume", "sinkmod:Sink", "--db", url, "--kafka", kafka_bootstrap, "--topic", kafka_topic,
                       "--group", group, "-X", "auto.offset.reset=earliest", "--progress-interval", "0.2",
                       "--batch-size", "20", "--log-format", "json"], log, cwd=tmp_path)

    def processed() -> int:
        with engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(T.processed)
                                 .where(T.processed.c.consumer == "logs.sink")).scalar_one())
    try:
        # tansu may lose a partition's first record to a live reader: most, not all, is enough here
        _wait(lambda: processed() >= n // 2, 90, "consumer", consume, log)
    finally:
        assert _stop(consume) == 0
    text = log.read_text()
    lines = _json_lines(text)
    assert SECRET not in text
    assert any(o.get("consumer") == "logs.sink" and re.search(r"processed \d+, duplicates 0, .*msg/s", o["message"])
               for o in lines), text[-2000:]
    stopped = [o["message"] for o in lines if "stopped (" in o["message"]]
    assert stopped and re.search(r"stopped \(processed \d+, duplicates \d+, retries \d+, dead \d+, batches \d+\)",
                                 stopped[-1]) and "RunnerStats" not in text


@pytest.mark.parametrize("dialect_name", ["postgresql"], indirect=True)
def test_relay_and_consume_json_logs_on_rabbitmq(engine, db_url, rabbitmq_url, amqp_names, tmp_path) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    ch = conn.channel()
    ch.exchange_declare(amqp_names["exchange"], "topic", durable=True)
    ch.queue_declare(amqp_names["queue"], durable=True)
    ch.queue_bind(amqp_names["queue"], amqp_names["exchange"], routing_key="#")
    conn.close()
    url = _with_password(db_url)
    n = 200
    _write_rows(engine, amqp_names["exchange"], n)
    log = tmp_path / "relay.log"
    relay = _daemon(["relay", "--db", url, "--rabbitmq", rabbitmq_url, "--log-format", "json",
                     "--topic", amqp_names["exchange"]], log)
    try:
        _wait(lambda: _pending(engine, amqp_names["exchange"]) == 0, 90, "relay drain", relay, log)
    finally:
        assert _stop(relay) == 0
    text = log.read_text()
    lines = _json_lines(text)
    assert SECRET not in text and "guest:guest" not in text
    assert not [o for o in lines if o["logger"].startswith("pika") and o["level"] == "INFO"]

    (tmp_path / "sinkmod.py").write_text(CONSUMER_MODULE)
    log = tmp_path / "consume.log"
    consume = _daemon(["--log-format", "json", "consume", "sinkmod:Sink", "--db", url, "--rabbitmq", rabbitmq_url,
                       "--queue", amqp_names["queue"], "--progress-interval", "0.01", "--batch-size", "5"],
                      log, cwd=tmp_path)

    def processed() -> int:
        with engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(T.processed)
                                 .where(T.processed.c.consumer == "logs.sink")).scalar_one())
    try:
        _wait(lambda: processed() >= n, 90, "consumer", consume, log)
    finally:
        assert _stop(consume) == 0
    text = log.read_text()
    lines = _json_lines(text)
    assert SECRET not in text and "guest:guest" not in text
    assert any(o.get("consumer") == "logs.sink" and "msg/s" in o["message"] for o in lines), text[-2000:]
    assert any(f"stopped (processed {n}, duplicates 0" in o["message"] for o in lines), text[-2000:]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_kafka_for_60_s_logs_a_few_lines_per_error(tmp_path) -> None:
    db = f"sqlite:///{tmp_path}/o.db"
    assert subprocess.run([sys.executable, "-m", "outbox", "db", "upgrade", "--db", db], env=_env(),
                          capture_output=True, timeout=60).returncode == 0
    seconds = float(os.environ.get("OUTBOX_TEST_UNREACHABLE_SECONDS", "60"))
    log = tmp_path / "relay.log"
    relay = _daemon(["relay", "--db", db, "--kafka", f"127.0.0.1:{_closed_port()}", "--log-format", "json"], log)
    try:
        time.sleep(seconds)  # the duration under test: nothing to await
        assert relay.poll() is None, log.read_text()[-3000:]
    finally:
        assert _stop(relay) == 0
    every = _json_lines(log.read_text())
    assert len([o for o in every if "joined relay group" in o["message"]]) == 1  # not once per reconnect
    lines = [o for o in every if o["level"] in ("WARNING", "ERROR", "CRITICAL")]
    per_error = Counter((o["logger"], re.sub(r"\d+(?:\.\d+)?", "#", o["message"].split(" (repeated")[0]))
                        for o in lines)
    assert lines and any("librdkafka" in o["logger"] for o in lines), lines  # librdkafka goes through logging
    assert max(per_error.values()) <= 4, per_error
    assert len(lines) <= 4 * len(per_error) and len(lines) <= 30, per_error


@pytest.mark.parametrize("dialect_name", ["sqlite"], indirect=True)
def test_progress_rate_is_over_the_time_the_work_took(engine, caplog) -> None:
    import threading

    n, every = 500, 4.0  # a 4 s window: the 500-row burst takes well under 2.7 s even on a loaded machine
    _write_rows(engine, "burst", n)
    relay = Relay(engine, MemoryPublisher(), config=RelayConfig(progress_interval=every, poll_interval=0.1))
    caplog.set_level(logging.INFO, logger="outbox.relay")
    t = threading.Thread(target=relay.run, daemon=True)
    began = time.monotonic()
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not [r for r in caplog.records if "busy" in r.getMessage()] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        relay.stop()
        t.join(30)
    [line] = [r.getMessage() for r in caplog.records if "busy" in r.getMessage()][:1]
    m = re.search(r"published (\d+) \(\+(\d+) in ([\d.]+) s busy: (\d+) msg/s\)", line)
    assert m, line
    sent, busy, rate = int(m.group(2)), float(m.group(3)), int(m.group(4))
    window = time.monotonic() - began
    assert sent == n and busy < every and window >= every
    assert rate > 1.5 * sent / every, line  # averaged over the 4 s window it would read at most sent / 4 s
    # busy is printed with two decimals: the rate (from the exact time) lies within what they allow
    assert sent / (busy + 0.005) - 1 <= rate <= sent / max(busy - 0.005, 1e-9) + 1, line


def test_repeats_not_reported_yet_are_reported_at_exit() -> None:
    import io

    now = [0.0]
    f = RateLimitFilter(30, clock=lambda: now[0])
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.addFilter(f)
    h.setFormatter(JsonFormatter())
    for i in range(5):
        now[0] += 1
        h.handle(_record("broker down, retrying in %d s", i))
    f.flush(h)
    f.flush(h)  # reported once
    lines = _json_lines(out.getvalue())
    assert [o["message"] for o in lines] == ["broker down, retrying in 0 s",
                                             "broker down, retrying in 4 s (repeated 4 times in 4 s)"]


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"], indirect=True)
def test_status_estimates_published_rows_of_a_big_audit_table(engine: sa.Engine, db_url: str, capsys) -> None:
    """Plain layout in audit mode: from ESTIMATE_ABOVE published rows, ``published`` is the table's
    estimated rows less the exact pending/dead counts (``published_estimate``), not a count(*) of them."""
    from outbox import admin

    # well above the threshold: InnoDB's table_rows after ANALYZE TABLE is a sampled estimate, which
    # for 100,500 rows came out under 100,000 in about one run in six
    n = 2 * admin.ESTIMATE_ABOVE
    pg = engine.dialect.name == "postgresql"
    rows = ("SELECT gen_random_uuid(), 't', '\\x00'::bytea, 0, now(), now(), 'published' FROM generate_series(1, :n)"
            if pg else "SELECT REPLACE(UUID(), '-', ''), 't', X'00', 0, NOW(6), NOW(6), 'published' "
                       "FROM seq_1_to_100000000 WHERE seq <= :n")
    col = '"partition"' if pg else "`partition`"
    with engine.begin() as c:
        c.execute(sa.text(f"INSERT INTO outbox_messages (message_id, topic, payload, {col}, created_at, available_at, "
                          f"status) {rows}"), {"n": n})
    with Session(engine) as s, s.begin():
        Outbox().add(s, "orders", {"n": 1})  # one pending row, counted exactly
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(sa.text("ANALYZE outbox_messages" if pg else "ANALYZE TABLE outbox_messages"))
    st = admin.outbox_status(engine)
    assert st["pending"] == 1 and st["published_estimate"] is True and st["archived_estimate"] is False
    assert abs(st["published"] - n) <= n // 2, st["published"]  # InnoDB's table_rows is a rough estimate
    exact = admin.outbox_status(engine, estimate_above=None)
    assert (exact["published"], exact["published_estimate"]) == (n, False)
    code, out, _ = run_cli(capsys, "status", "--db", db_url)
    assert code == 0 and f"published:      ~{st['published']}  (kept in audit mode; the database's estimate, " \
        "not an exact count)" in out, out
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--json")
    assert code == 0 and json.loads(out)["published_estimate"] is True
