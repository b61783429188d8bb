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


def test_outbox_relay_finds_it_by_name_and_publishes(installed: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'outbox.db'}"
    migrations.upgrade(db)
    engine = sa.create_engine(db)
    with Session(engine) as s, s.begin():
        ids = [Outbox().add(s, "orders", {"n": i}, key=f"k{i % 2}") for i in range(3)]
    broker = tmp_path / "broker"
    (broker / "orders").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), str(HERE), str(ROOT)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox", "relay", "--db", db, "--broker", "jsonl", "--broker-url", str(broker),
         "-X", "fsync=true", "-X", "token=tok-s3cret", "--poll-interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    from outboxkit_jsonl.publisher import read_lines

    try:
        wait_for(lambda: len(read_lines(broker, "orders")) >= 3 or proc.poll() is not None, 60, "3 lines written")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = read_lines(broker, "orders")
    assert [line["headers"][MESSAGE_ID_HEADER] for line in lines] == [str(i) for i in ids]
    assert "tok-s3cret" not in out + err
    t = default_tables().outbox
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() == 0  # published rows deleted
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
