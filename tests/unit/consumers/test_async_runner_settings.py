"""The asyncio runners' settings checks and the CLI's async-engine URL translation (no broker contacted)."""

from __future__ import annotations

import importlib.util

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import consumers
from outbox.cli._common import make_async_engine, sync_database_url
from outbox.errors import ConfigurationError


class AsyncNamed(consumers.AsyncDedupConsumer):
    name = "test.async-named"

    async def handle(self, session, message):
        return None


class SyncNamed(consumers.DedupConsumer):
    name = "test.sync-named"

    def handle(self, session, message):
        return None


async def test_async_runner_settings_are_checked(tmp_path):
    aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    sync = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    kafka = {"bootstrap_servers": "x:1", "topics": ["t"], "group_id": "g"}
    try:
        with pytest.raises(ConfigurationError, match="AsyncDedupConsumer"):
            consumers.AsyncKafkaRunner(SyncNamed(), engine=aengine, **kafka)
        with pytest.raises(ConfigurationError, match="AsyncEngine"):
            consumers.AsyncKafkaRunner(AsyncNamed(), engine=sync, **kafka)
        with pytest.raises(ConfigurationError, match=r"enable\.auto\.commit"):
            consumers.AsyncKafkaRunner(AsyncNamed(), engine=aengine, config={"enable.auto.commit": True}, **kafka)
        with pytest.raises(ConfigurationError, match="prefetch"):
            consumers.AsyncRabbitMQRunner(AsyncNamed(), engine=aengine, url="amqp://u:secret@h/", queue="q",
                                          batch_size=10, prefetch=5)
        r = consumers.AsyncRabbitMQRunner(AsyncNamed(), engine=aengine, url="amqp://h/", queue="q", batch_size=10)
        assert r.prefetch == 20
        r.stop()  # before run(): run() returns at once, nothing connected
        await r.run()
        assert r.connections == 0
    finally:
        await aengine.dispose()
        sync.dispose()


def test_async_engine_from_the_db_url(tmp_path):
    (tmp_path / "x.db").touch()
    cases = {f"sqlite:///{tmp_path}/x.db": "sqlite+aiosqlite", "postgresql+psycopg://u@h/db": "postgresql+psycopg"}
    for url, driver in cases.items():
        e = make_async_engine(sa.create_engine(url))
        assert e.url.drivername == driver
        assert e.url.database == sa.engine.make_url(url).database
    # an async driver typed in --db: the schema check gets the sync one, the consumer the one typed
    assert sync_database_url("postgresql+asyncpg://u:pw@h/db") == "postgresql+psycopg://u:pw@h/db"
    assert sync_database_url("sqlite+aiosqlite:///x.db") == "sqlite+pysqlite:///x.db"
    assert sync_database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    given = "postgresql+asyncpg://u@h/db"
    if importlib.util.find_spec("asyncpg") is not None:
        assert make_async_engine(sa.create_engine(sync_database_url(given)), given=given).url.drivername == \
            "postgresql+asyncpg"


def test_a_missing_async_driver_says_what_to_install():
    mysql = sa.create_engine("mysql+pymysql://root:secret@127.0.0.1/test")
    installed = [d for d in ("asyncmy", "aiomysql") if importlib.util.find_spec(d) is not None]
    if installed:
        assert make_async_engine(mysql).url.drivername == f"mysql+{installed[0]}"
        return
    with pytest.raises(ConfigurationError, match=r"pip install aiomysql \(or asyncmy\)") as err:
        make_async_engine(mysql)
    assert "secret" not in str(err.value)
