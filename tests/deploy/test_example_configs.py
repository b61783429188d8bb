"""examples/relay.toml and examples/consume.toml go through the real config loader, and a daemon
started with each gets past every settings check to the database (an empty SQLite file here, so it
stops at the schema check with the documented message)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from outbox.cli import build_parser, consume
from outbox.cli._settings import load_config_file, resolve
from outbox.cli.relay import build
from outbox.config import load_toml

REPO = Path(__file__).resolve().parents[2]
RELAY_TOML = REPO / "examples" / "relay.toml"
CONSUME_TOML = REPO / "examples" / "consume.toml"
ENV_NAMES = [v for s in consume.settings() for v in s.env] + ["OUTBOX_CONFIG"]


def _clean_env(monkeypatch) -> None:
    for name in [*ENV_NAMES, *[k for k in os.environ if k.startswith("OUTBOX_RELAY_")]]:
        monkeypatch.delenv(name, raising=False)


def test_relay_toml_sets_every_key_it_holds(monkeypatch) -> None:
    _clean_env(monkeypatch)
    table = load_toml(RELAY_TOML)["relay"]
    engine, publisher, config = build(build_parser().parse_args(["relay", "--config", str(RELAY_TOML)]))
    try:
        for key, value in table.items():
            if key in ("db", "kafka"):
                continue
            got = getattr(config, key)
            assert got == (tuple(value) if isinstance(value, list) else value), key
        assert engine.url.host == "127.0.0.1" and engine.url.database == "app"
        assert publisher._conf["compression.type"] == "lz4"  # the [kafka] table reaches librdkafka
    finally:
        publisher.close(timeout=1)
        engine.dispose()


def test_consume_toml_sets_every_key_it_holds(monkeypatch) -> None:
    _clean_env(monkeypatch)
    table = load_toml(CONSUME_TOML)["consume"]
    args = build_parser().parse_args(["consume", "x:C", "--config", str(CONSUME_TOML)])
    values = resolve(consume.settings(), args, table="consume", file=load_config_file(str(CONSUME_TOML)),
                     file_label=str(CONSUME_TOML))
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()} == table


def _dry_start(tmp_path, *argv: str) -> subprocess.CompletedProcess[str]:
    db = tmp_path / "empty.db"
    sqlite3.connect(db).close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    return subprocess.run([sys.executable, "-m", "outbox", *argv, "--db", f"sqlite:///{db}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_relay_starts_with_the_example_file(tmp_path) -> None:
    proc = _dry_start(tmp_path, "relay", "--config", "examples/relay.toml")
    assert proc.returncode == 1, proc.stderr
    assert "tables are missing" in proc.stderr and "outbox db upgrade" in proc.stderr, proc.stderr


def test_consume_starts_with_the_example_file(tmp_path) -> None:
    proc = _dry_start(tmp_path, "consume", "examples.04_dedup_consumer:ChargeOrder", "--config",
                      "examples/consume.toml")
    assert proc.returncode == 1, proc.stderr
    assert "tables are missing" in proc.stderr and "outbox db upgrade" in proc.stderr, proc.stderr


def test_a_typo_in_the_example_file_is_refused(tmp_path) -> None:
    """The dry start above is not blind: a wrong key in the same file stops the relay with exit 2."""
    bad = tmp_path / "relay.toml"
    bad.write_text(RELAY_TOML.read_text().replace("batch_size", "batch_sizes"))
    proc = _dry_start(tmp_path, "relay", "--config", str(bad))
    assert proc.returncode == 2 and "unknown key 'batch_sizes' in [relay]" in proc.stderr, proc.stderr


@pytest.mark.kafka
def test_relay_with_the_example_file_publishes_and_stops_cleanly(tmp_path, kafka_bootstrap, kafka_topic) -> None:
    """The shipped relay.toml (its [kafka] table included) runs a real relay: rows written to a SQLite
    outbox reach Kafka (the relay deletes a row only after the broker's ack), and SIGTERM ends it with 0."""
    import signal
    import time

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from outbox import Outbox, OutgoingMessage

    db = f"sqlite:///{tmp_path / 'outbox.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    up = subprocess.run([sys.executable, "-m", "outbox", "db", "upgrade", "--db", db], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    engine = sa.create_engine(db)
    outbox = Outbox()
    with Session(engine) as session, session.begin():
        outbox.add_many(session, [OutgoingMessage(kafka_topic, {"n": i}, key=f"k{i % 3}") for i in range(20)])
    table = outbox.tables.outbox
    count = sa.select(sa.func.count()).select_from(table)
    proc = subprocess.Popen([sys.executable, "-m", "outbox", "relay", "--config", "examples/relay.toml", "--db", db,
                             "--kafka", kafka_bootstrap, "--topics", kafka_topic], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        left = 20
        while left and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # polling a table another process drains: no event to wait on
            with engine.connect() as conn:
                left = conn.execute(count).scalar_one()
        assert left == 0, f"{left} rows left; relay exit {proc.poll()}"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        engine.dispose()
