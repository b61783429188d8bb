"""examples/relay.toml and examples/consume.toml go through the real config loader, and a daemon
started with each gets past every settings check to the database (an empty SQLite file here, so it
stops at the schema check with the documented message)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

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
