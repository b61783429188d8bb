"""A third-party transport, installed only by its entry point, found by `outbox relay --broker` and
held to both contract suites of outbox.testing, exactly as an external package would run them.

The transport (``outboxkit_jsonl/``) and its distribution metadata (``pyproject.toml``) live in this
folder; nothing in outboxkit names it. The ``installed`` fixture makes the ``.dist-info`` folder pip
would write, from the entry point table of ``pyproject.toml``.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox import Outbox, default_tables, migrations
from outbox.testing import (
    ConsumerHarness,
    ConsumerRunnerContract,
    Features,
    PublisherContract,
    PublisherHarness,
    Received,
    wait_for,
)
from outbox.transports import ENTRY_POINT_GROUP, get, names
from outbox.transports.base import MESSAGE_ID_HEADER, Outcome
from outbox.transports.codecs import get_codec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

FEATURES = Features(missing_topic=Outcome.FAILED, missing_topic_reason="UNKNOWN_TOPIC", broker_timestamps=True)


def _install(site: Path) -> None:
    """Write what `pip install outboxkit-jsonl` would put in site-packages: its dist-info."""
    project = tomllib.loads((HERE / "pyproject.toml").read_text())["project"]
    dist = site / f"outboxkit_jsonl-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    table = project["entry-points"][ENTRY_POINT_GROUP]
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "".join(f"{k} = {v}\n"
                                                                               for k, v in table.items()))


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The package importable and its entry point visible, for this test only."""
    site = tmp_path / "site"
    _install(site)
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_only_the_entry_point_registers_it(installed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "jsonl" in names()
    transport = get("jsonl")
    assert (transport.name, transport.binding) == ("jsonl", "kafka")
    monkeypatch.undo()  # uninstalled: the name is gone again
    assert "jsonl" not in names()


def test_outboxkit_itself_never_names_the_transport() -> None:
    """Adding it touched only this folder: no file of outboxkit mentions it."""
    mentions = [str(p.relative_to(ROOT)) for folder in ("outbox", "consumers")
                for p in (ROOT / folder).rglob("*.py") if "jsonl" in p.read_text(encoding="utf-8")]
    assert mentions == []


CONSUMER = """
import gc

import sqlalchemy as sa
from consumers import DedupConsumer


class Counter(DedupConsumer):
    name = "jsonl.counter"

    def handle(self, session, message):
        session.execute(sa.text("INSERT INTO jsonl_effects (message_id, frozen, gen0) VALUES (:m, :f, :g)"),
                        {"m": message.id, "f": gc.get_freeze_count(), "g": gc.get_threshold()[0]})
"""


def _run_until(cmd: list[str], env: dict[str, str], cwd: Path, done, what: str) -> tuple[str, str]:
    """Run an `outbox` command until ``done()``, then SIGTERM it; it must exit 0."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        wait_for(lambda: done() or proc.poll() is not None, 60, what)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out, err


def test_outbox_relay_and_outbox_consume_find_it_by_name(installed: Path, tmp_path: Path) -> None:
    from outboxkit_jsonl.publisher import FILE_NAME, read_lines

    db = f"sqlite:///{tmp_path / 'outbox.db'}"
    migrations.upgrade(db)
    engine = sa.create_engine(db)
    with Session(engine) as s, s.begin():
        ids = [Outbox().add(s, "orders", {"n": i}, key=f"k{i % 2}") for i in range(3)]
    broker = tmp_path / "broker"
    (broker / "orders").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(HERE), str(tmp_path), str(ROOT)])}
    out, err = _run_until(
        [sys.executable, "-m", "outbox", "relay", "--db", db, "--broker", "jsonl", "--broker-url", str(broker),
         "-X", "fsync=true", "-X", "token=tok-s3cret", "--poll-interval", "0.05"],
        env, tmp_path, lambda: len(read_lines(broker, "orders")) >= 3, "3 lines written")
    lines = read_lines(broker, "orders")
    assert [line["headers"][MESSAGE_ID_HEADER] for line in lines] == [str(i) for i in ids]
    assert "tok-s3cret" not in out + err
    t = default_tables().outbox
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() == 0  # published rows deleted

    # every message delivered twice (the relay's at least once), consumed by `outbox consume --broker jsonl`
    path = broker / "orders" / FILE_NAME
    path.write_text(path.read_text() * 2)
    (tmp_path / "app_jsonl.py").write_text(CONSUMER)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE jsonl_effects (message_id VARCHAR(64) NOT NULL, frozen INTEGER NOT NULL, "
                           "gen0 INTEGER NOT NULL)"))

    def effects() -> list[str]:
        with engine.connect() as c:
            return sorted(c.execute(sa.text("SELECT message_id FROM jsonl_effects")).scalars())

    offset = broker / "orders" / "billing.offset"
    _run_until([sys.executable, "-m", "outbox", "consume", "app_jsonl:Counter", "--db", db, "--broker", "jsonl",
                "--broker-url", str(broker), "--topic", "orders", "--group", "billing", "--batch-timeout", "0.1"],
               env, tmp_path, lambda: offset.exists() and offset.read_text() == "6", "all 6 lines settled")
    assert effects() == sorted(str(i) for i in ids)  # each once
    with engine.connect() as c:  # the daemon froze its start-up heap: later collections skip it
        assert c.execute(sa.text("SELECT min(frozen) FROM jsonl_effects")).scalar_one() > 0
        # and collects the young generation only once 10,000 more objects are alive, not 700
        assert c.execute(sa.text("SELECT min(gen0) FROM jsonl_effects")).scalar_one() >= 10_000
    engine.dispose()


def test_a_bad_option_names_the_known_ones(installed: Path) -> None:
    from outbox.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="known: fsync, max_bytes, token"):
        get("jsonl").publisher("/tmp", {"fsink": "true"}, codec=get_codec("native"))


class TestJsonlPublisher(PublisherContract):
    features = FEATURES

    @pytest.fixture
    def harness(self, installed: Path, tmp_path: Path) -> PublisherHarness:
        from outboxkit_jsonl.publisher import read_lines

        broker = tmp_path / "broker"
        topic = f"t-{uuid.uuid4().hex[:8]}"
        (broker / topic).mkdir(parents=True)
        transport = get("jsonl")  # found through the entry point, as `outbox relay --broker jsonl` finds it

        def make(**settings: str):
            return transport.publisher(str(broker), settings, codec=get_codec("native"))

        def read(n: int, timeout: float) -> list[Received]:
            deadline = time.monotonic() + timeout
            while True:
                got = [Received(topic, line["key"], line["payload"], line["headers"],
                                line["headers"].get("content-type"), line["headers"].get(MESSAGE_ID_HEADER),
                                timestamp=None if line["timestamp"] is None
                                else dt.datetime.fromisoformat(line["timestamp"]))
                       for line in read_lines(broker, topic)]
                if len(got) >= n or time.monotonic() >= deadline:
                    return got
                time.sleep(0.05)

        def unreachable():
            secret = "jsonl-s3cret-token"
            return transport.publisher(str(tmp_path / "no-such-dir"), {"token": secret},
                                       codec=get_codec("native")), secret

        return PublisherHarness(topic, f"missing-{uuid.uuid4().hex[:8]}", make, read, unreachable)


class TestJsonlRunner(ConsumerRunnerContract):
    features = FEATURES

    @pytest.fixture
    def harness(self, installed: Path, tmp_path: Path) -> ConsumerHarness:
        from outboxkit_jsonl.publisher import read_lines

        broker = tmp_path / "broker"
        topic = f"t-{uuid.uuid4().hex[:8]}"
        (broker / topic).mkdir(parents=True)
        transport = get("jsonl")

        def backlog(published: int) -> int:
            offset_file = broker / topic / "contract.offset"
            return len(read_lines(broker, topic)) - (int(offset_file.read_text()) if offset_file.exists() else 0)

        return ConsumerHarness(
            topic=topic,
            publisher=lambda: transport.publisher(str(broker), {}, codec=get_codec("native")),
            runner=lambda consumer, engine: transport.runner(consumer, engine=engine, target=str(broker), settings={},
                                                             codec=get_codec("native"), topics=[topic],
                                                             group_id="contract"),
            backlog=backlog,
        )
