"""Bad-input catalogue, CLI and config: bad flags, environment variables, URLs and TOML files.

Each case runs ``outbox ...`` (in-process through :func:`outbox.cli.main`, whose output is the
command's; a few through a real subprocess) and asserts the exit code, the error fragment on
stderr, that there is no traceback, and that the password given somewhere in the input
(``S3cretPW``, in a database or broker URL or a ``sasl.password`` setting) appears nowhere in the
output, logs included. Placeholders in the arguments: ``{ok}`` an SQLite database with the toolkit's
tables, ``{empty}`` an SQLite file without them, ``{pg_empty}`` / ``{my_empty}`` PostgreSQL / MariaDB
databases without them (the PostgreSQL URL carries the password: trust authentication ignores it),
``{missing}`` an SQLite file that does not exist, ``{config}`` the TOML file of the case, ``{dir}``
the case's folder.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from outbox import migrations
from outbox.cli import main

PW = "S3cretPW"
PG_ADMIN = os.environ.get("OUTBOX_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MY_ADMIN = os.environ.get("OUTBOX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
RABBIT = f"amqp://guest:{PW}@127.0.0.1:1/%2F"
BROKER_ENV = ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "OUTBOX_KAFKA_SERVERS", "KAFKA_BOOTSTRAP_SERVERS",
              "OUTBOX_RABBITMQ_URL", "OUTBOX_DB_URL", "OUTBOX_CONFIG", "OUTBOX_LOG_LEVEL")

CONSUMER_MODULE = '''
from consumers import DedupConsumer

class C(DedupConsumer):
    name = "catalogue.c"

    def handle(self, session, message):
        return None
'''


def _server_db(admin_url: str) -> Iterator[str]:
    url = make_url(admin_url)
    name = f"okt_cli_{uuid.uuid4().hex[:8]}"
    pg = url.get_backend_name() == "postgresql"
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with engine.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"' if pg else f"CREATE DATABASE `{name}`"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' if pg
                              else f"DROP DATABASE IF EXISTS `{name}`"))
        engine.dispose()


@pytest.fixture(scope="module")
def pg_empty() -> Iterator[str]:
    for url in _server_db(PG_ADMIN):
        yield make_url(url).set(password=PW).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def my_empty() -> Iterator[str]:
    yield from _server_db(MY_ADMIN)


@pytest.fixture(scope="module")
def sqlite_ok(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('cli-ok') / 'ok.db'}"
    migrations.upgrade(url)
    return url


@pytest.fixture
def places(tmp_path: Path, sqlite_ok: str, monkeypatch: pytest.MonkeyPatch,
           request: pytest.FixtureRequest) -> dict[str, str]:
    for name in BROKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "catalogue_consumer.py").write_text(CONSUMER_MODULE)
    (tmp_path / "empty.db").touch()
    out = {"ok": sqlite_ok, "empty": f"sqlite:///{tmp_path / 'empty.db'}",
           "missing": f"sqlite:///{tmp_path / 'typo.db'}",
           "config": str(tmp_path / "outbox.toml"), "dir": str(tmp_path)}
    return out


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """The relay and consume commands install SIGTERM/SIGINT handlers: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(code: int, out: str, err: str, expect_code: int, fragment: str) -> None:
    text = out + err
    assert code == expect_code, f"exit {code}, wanted {expect_code}\n{text}"
    assert fragment in err, f"{fragment!r} not on stderr:\n{err}"
    assert "Traceback" not in text
    assert PW not in text, f"password in the output:\n{text}"


def case(cid: str, argv: list[str], code: int, fragment: str, *, env: dict[str, str] | None = None,
         toml: str | bytes | None = None, what: str = "") -> Any:
    expected = f"exit {code}: {fragment}"
    return pytest.param(argv, env or {}, toml, code, fragment, id=cid,
                        marks=pytest.mark.catalogue(area="config" if cid.startswith("config-") else "cli",
                                                    input=what or " ".join(argv), expected=expected))


KAFKA = ["--kafka", "127.0.0.1:1"]
CONSUME = ["consume", "catalogue_consumer:C"]
CONSUME_K = [*CONSUME, *KAFKA, "--topic", "t", "--group", "g"]
NO_SCHEMA = "tables are missing"
UPGRADE = "run `outbox db upgrade --db URL`"
RELAY_TOML = '[relay]\ndb = "{ok}"\nkafka = "127.0.0.1:1"\n'

CASES = [
    # -- 8: passwords in argparse errors and -X
    case("cli-unrecognized-arg-shows-no-password",
         ["status", "--dbb", f"postgresql+psycopg://postgres:{PW}@127.0.0.1:1/x"], 2,
         "unrecognized arguments: --dbb postgresql+psycopg://postgres:***@127.0.0.1:1/x"),
    case("cli-x-without-equals-shows-no-password",
         ["relay", "--db", "{ok}", *KAFKA, "-X", f"sasl.password {PW}"], 2,
         "-X takes KEY=VALUE; no '=' in the one starting 'sasl.password'",
         what=f'relay --db {{ok}} --kafka 127.0.0.1:1 -X "sasl.password {PW}"'),
    case("cli-consumer-config-without-equals-shows-no-password",
         [*CONSUME_K, "--db", "{ok}", "--consumer-config", f"sasl.password {PW}"], 2,
         "-X takes KEY=VALUE; no '=' in the one starting 'sasl.password'"),
    # the quotes forgotten: the password is a word of its own, which argparse or the command quote back
    case("cli-x-password-as-its-own-word-relay", ["relay", "--db", "{ok}", *KAFKA, "-X", "sasl.password", PW], 2,
         "unrecognized arguments: ***", what=f"relay --db {{ok}} --kafka 127.0.0.1:1 -X sasl.password {PW} (unquoted)"),
    case("cli-x-password-as-its-own-word-after-equals", ["relay", "--db", "{ok}", *KAFKA, "-X", "sasl.password=", PW],
         2, "unrecognized arguments: ***"),
    case("cli-x-password-as-its-own-word-consume", [*CONSUME_K, "--db", "{ok}", "-X", "sasl.password", PW], 2,
         "unrecognized arguments: ***", what=f"{' '.join(CONSUME_K)} --db {{ok}} -X sasl.password {PW} (unquoted)"),
    case("cli-x-password-taken-as-the-consumer", [*CONSUME_K[:1], *CONSUME_K[2:], "--db", "{ok}", "-X",
                                                  "sasl.password=", PW], 2,
         "consumer must be given as MODULE:CLASS, got '***'"),
    case("cli-x-key-with-spaces", ["relay", "--db", "{ok}", *KAFKA, "-X", f"sasl password={PW}"], 2,
         "-X takes KEY=VALUE; a key has no spaces, see the one starting 'sasl'"),
    case("cli-x-empty-key", ["relay", "--db", "{ok}", *KAFKA, "-X", f"={PW}"], 2,
         "-X takes KEY=VALUE, got an empty key"),
    case("cli-misplaced-password-url-in-int-flag",
         ["relay", "--db", "{ok}", *KAFKA, "--batch-size", f"postgresql://u:{PW}@h/x"], 2,
         "argument --batch-size: 'postgresql://u:***@h/x' is not a valid int"),
    # -- 9: tracebacks
    case("cli-bad-consumer-batch-env-does-not-break-status", ["status", "--db", "{ok}"], 0, "",
         env={"OUTBOX_CONSUMER_BATCH_SIZE": "ten"}, what="OUTBOX_CONSUMER_BATCH_SIZE=ten, then `outbox status`"),
    case("cli-bad-consumer-batch-env-consume", [*CONSUME_K, "--db", "{ok}"], 2,
         "environment variable OUTBOX_CONSUMER_BATCH_SIZE = 'ten' is not a valid int: must be an integer",
         env={"OUTBOX_CONSUMER_BATCH_SIZE": "ten"}, what="OUTBOX_CONSUMER_BATCH_SIZE=ten, then `outbox consume`"),
    case("cli-bad-purge-batch-env-does-not-break-status", ["status", "--db", "{ok}"], 0, "",
         env={"OUTBOX_PURGE_BATCH_SIZE": "lots"}, what="OUTBOX_PURGE_BATCH_SIZE=lots, then `outbox status`"),
    case("cli-bad-purge-batch-env-purge", ["purge", "processed", "--older-than", "1d", "--db", "{ok}"], 2,
         "environment variable OUTBOX_PURGE_BATCH_SIZE = 'lots' is not a valid int",
         env={"OUTBOX_PURGE_BATCH_SIZE": "lots"}),
    case("cli-log-level-verbose", ["status", "--db", "{ok}", "--log-level", "verbose"], 2,
         "argument --log-level: 'verbose' is not a log level: use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    case("cli-log-level-env-bad", ["status", "--db", "{ok}"], 2,
         "environment variable OUTBOX_LOG_LEVEL: 'loud' is not a log level", env={"OUTBOX_LOG_LEVEL": "loud"}),
    case("cli-lease-ttl-nan", ["relay", "--db", "{ok}", *KAFKA, "--lease-ttl", "nan"], 2,
         "argument --lease-ttl: 'nan' is not a valid float: must be a finite number"),
    case("cli-lease-ttl-inf", ["relay", "--db", "{ok}", *KAFKA, "--lease-ttl", "inf"], 2,
         "argument --lease-ttl: 'inf' is not a valid float: must be a finite number"),
    case("cli-lease-ttl-inf-env", ["relay", "--db", "{ok}", *KAFKA], 2,
         "environment variable OUTBOX_RELAY_LEASE_TTL = '1e999' is not a valid float: must be a finite number",
         env={"OUTBOX_RELAY_LEASE_TTL": "1e999"}),
    # -- 10: forgotten db upgrade, every command
    case("cli-status-without-schema-postgresql", ["status", "--db", "{pg_empty}"], 1, UPGRADE),
    case("cli-dead-list-without-schema-postgresql", ["dead", "list", "--db", "{pg_empty}"], 1, UPGRADE),
    case("cli-dead-list-consumer-without-schema-postgresql",
         ["dead", "list", "--consumer", "x", "--db", "{pg_empty}"], 1, UPGRADE),
    case("cli-purge-without-schema-postgresql",
         ["purge", "processed", "--older-than", "1d", "--db", "{pg_empty}"], 1, UPGRADE),
    case("cli-consume-without-schema-postgresql", [*CONSUME_K, "--db", "{pg_empty}"], 1, UPGRADE),
    case("cli-relay-without-schema-postgresql", ["relay", "--db", "{pg_empty}", *KAFKA], 1, UPGRADE),
    case("cli-relay-without-schema-sqlite", ["relay", "--db", "{empty}", "--rabbitmq", RABBIT], 1, UPGRADE),
    case("cli-consume-without-schema-sqlite", [*CONSUME, "--db", "{empty}", "--rabbitmq", RABBIT, "--queue", "q"], 1,
         UPGRADE),
    # -- 11: URLs, files, non-finite numbers
    case("cli-postgres-scheme-gets-psycopg", ["status", "--db", "{pg_empty_heroku}"], 1,
         "using the psycopg driver (postgresql+psycopg)", what="status --db postgres://... (Heroku style)"),
    case("cli-mysql-scheme-gets-pymysql", ["status", "--db", "{my_empty_plain}"], 1,
         "using the pymysql driver (mysql+pymysql)", what="status --db mysql://..."),
    case("cli-missing-driver", ["status", "--db", f"postgresql+psycopg2://u:{PW}@127.0.0.1/x"], 2,
         "pip install 'outboxkit[postgresql]'"),
    case("cli-bad-url-scheme", ["status", "--db", f"http://u:{PW}@127.0.0.1/x"], 2, "unknown database kind 'http'"),
    case("cli-not-a-url", ["dead", "list", "--db", "not a url"], 2, "is not a database URL"),
    case("cli-missing-db", ["status"], 2, "no database given: pass --db URL or set OUTBOX_DB_URL"),
    case("cli-relay-missing-db", ["relay", *KAFKA], 2, "no database given"),
    case("cli-status-sqlite-typo", ["status", "--db", "{missing}"], 2, "no such database file"),
    case("cli-dead-sqlite-typo", ["dead", "list", "--db", "{missing}"], 2, "no such database file"),
    case("cli-purge-sqlite-typo", ["purge", "published", "--older-than", "1d", "--db", "{missing}"], 2,
         "no such database file"),
    case("cli-db-current-sqlite-typo", ["db", "current", "--db", "{missing}"], 2, "no such database file"),
    case("cli-db-downgrade-sqlite-typo", ["db", "downgrade", "base", "--db", "{missing}"], 2, "no such database file"),
    case("cli-relay-sqlite-typo", ["relay", "--db", "{missing}", *KAFKA], 2, "no such database file"),
    case("cli-consume-sqlite-typo", [*CONSUME_K, "--db", "{missing}"], 2, "no such database file"),
    case("cli-poll-interval-nan", ["relay", "--db", "{ok}", *KAFKA, "--poll-interval", "nan"], 2,
         "argument --poll-interval: 'nan' is not a valid float: must be a finite number"),
    case("cli-consume-batch-timeout-inf", [*CONSUME_K, "--db", "{ok}", "--batch-timeout", "inf"], 2,
         "argument --batch-timeout: 'inf' is not a valid float: must be a finite number"),
    case("cli-consume-requeue-interval-nan", [*CONSUME_K, "--db", "{ok}", "--requeue-interval", "nan"], 2,
         "argument --requeue-interval: 'nan' is not a valid float: must be a finite number"),
    # -- other bad values
    case("cli-relay-batch-size-0", ["relay", "--db", "{ok}", *KAFKA, "--batch-size", "0"], 2,
         "batch_size must be an int between 1 and 100000, got 0 (set by --batch-size)"),
    case("cli-relay-batch-size-negative", ["relay", "--db", "{ok}", *KAFKA, "--batch-size", "-5"], 2,
         "batch_size must be an int between 1 and 100000, got -5 (set by --batch-size)"),
    case("cli-consume-batch-size-0", [*CONSUME_K, "--db", "{ok}", "--batch-size", "0"], 2,
         "argument --batch-size: must be at least 1, got 0"),
    case("cli-huge-int", [*CONSUME_K, "--db", "{ok}", "--batch-size", "9" * 5000], 2, "(5002 characters)",
         what="--batch-size with 5,000 digits"),
    case("cli-relay-max-attempts-huge-env", ["relay", "--db", "{ok}", *KAFKA], 2,
         "max_attempts must be an int between 1 and 1000000, got 10000000000 (set by environment variable "
         "OUTBOX_RELAY_MAX_ATTEMPTS)", env={"OUTBOX_RELAY_MAX_ATTEMPTS": "10000000000"}),
    case("cli-bad-bool-env", ["relay", "--db", "{ok}", *KAFKA], 2,
         "environment variable OUTBOX_RELAY_NOTIFY = 'maybe' is not a valid bool",
         env={"OUTBOX_RELAY_NOTIFY": "maybe"}),
    case("cli-bad-ordering", ["relay", "--db", "{ok}", *KAFKA, "--ordering", "loose"], 2,
         "argument --ordering: must be one of strict, none, got 'loose'"),
    case("cli-unknown-librdkafka-key-relay", ["relay", "--db", "{ok}", *KAFKA, "-X", "foo.bar=1",
                                              "-X", f"sasl.password={PW}"], 2,
         'invalid Kafka producer setting: No such configuration property: "foo.bar"'),
    case("cli-unknown-librdkafka-key-consume", [*CONSUME_K, "--db", "{ok}", "-X", "foo.bar=1"], 2,
         'invalid Kafka consumer setting: No such configuration property: "foo.bar"'),
    case("cli-unknown-rabbitmq-option", ["relay", "--db", "{ok}", "--rabbitmq", RABBIT, "-X", "frobnicate=1"], 2,
         "unknown RabbitMQ publisher option 'frobnicate' (-X); known: "),
    case("cli-bad-rabbitmq-option-value", ["relay", "--db", "{ok}", "--rabbitmq", RABBIT, "-X", "confirm_window=many"],
         2, "-X confirm_window = 'many' is not a valid int"),
    case("cli-consume-rabbitmq-with-x", [*CONSUME, "--db", "{ok}", "--rabbitmq", RABBIT, "--queue", "q",
                                         "-X", "fetch.wait.max.ms=5"], 2, "-X passes librdkafka settings"),
    case("cli-both-brokers", ["relay", "--db", "{ok}", *KAFKA, "--rabbitmq", RABBIT], 2,
         "choose one broker: --kafka or --rabbitmq, not both"),
    case("cli-consume-kafka-without-group", [*CONSUME, "--db", "{ok}", *KAFKA, "--topic", "t"], 2,
         "--kafka needs --topic (at least one) and --group"),
    case("cli-deprecated-kafka-env-name", ["consume", "nosuch_catalogue_mod:C", "--db", "{ok}", "--topic", "t",
                                           "--group", "g"], 2,
         "environment variable OUTBOX_KAFKA_SERVERS is deprecated: use OUTBOX_KAFKA_BOOTSTRAP_SERVERS",
         env={"OUTBOX_KAFKA_SERVERS": "127.0.0.1:1"}),
    case("cli-dead-show-not-an-int", ["dead", "show", "--db", "{ok}", "abc"], 2,
         "argument id: invalid int value: 'abc'"),
    case("cli-purge-bad-duration", ["purge", "processed", "--db", "{ok}", "--older-than", "soon"], 2,
         "'soon' is not a duration"),
    case("cli-unknown-command", ["relya"], 2, "argument COMMAND: invalid choice: 'relya'"),
    # -- TOML files
    case("config-misspelt-table", ["relay", "--config", "{config}"], 2,
         "unknown table [rely]; known tables: [consume], [kafka], [rabbitmq], [relay]",
         toml='[rely]\nbatch_size = 10\n', what="[rely] instead of [relay]"),
    case("config-unknown-key-relay", ["relay", "--config", "{config}"], 2,
         "unknown key 'batchsize' in [relay]; known keys: ", toml=RELAY_TOML + "batchsize = 1\n"),
    case("config-unknown-key-consume", [*CONSUME, "--config", "{config}"], 2,
         "unknown key 'topic' in [consume]; known keys: ", toml='[consume]\ntopic = "t"\n'),
    case("config-top-level-key", ["relay", "--config", "{config}"], 2,
         "unknown top-level key 'batch_size'", toml="batch_size = 10\n"),
    case("config-nan", ["relay", "--config", "{config}"], 2,
         "[relay] poll_interval in ", toml=RELAY_TOML + "poll_interval = nan\n"),
    case("config-inf", ["relay", "--config", "{config}"], 2,
         "= inf is not a valid float: must be a finite number", toml=RELAY_TOML + "lease_ttl = inf\n"),
    case("config-bool-for-int", ["relay", "--config", "{config}"], 2,
         "= True is not a valid int: must be an integer", toml=RELAY_TOML + "batch_size = true\n"),
    case("config-string-for-float", ["relay", "--config", "{config}"], 2,
         "= 'fast' is not a valid float: must be a number", toml=RELAY_TOML + 'poll_interval = "fast"\n'),
    case("config-float-for-int", [*CONSUME, "--config", "{config}"], 2,
         "= 1.5 is not a valid int: must be an integer", toml='[consume]\nbatch_size = 1.5\n'),
    case("config-missing-file", ["relay", "--config", "{dir}/nope.toml"], 2, "nope.toml does not exist"),
    case("config-unreadable-file", ["consume", "x:C", "--config", "{dir}"], 2, "cannot read config file"),
    case("config-invalid-toml", ["relay", "--config", "{config}"], 2, "is not valid TOML",
         toml=f'[relay]\ndb = "postgresql://u:{PW}@h/x\n'),
    case("config-not-utf8", ["relay", "--config", "{config}"], 2, "is not valid TOML: not UTF-8 text",
         toml=b"[relay]\nrelay_id = '\xff'\n"),
    case("config-env-file", ["relay"], 2, "unknown table [rely]", toml="[rely]\n",
         env={"OUTBOX_CONFIG": "{config}"}, what="OUTBOX_CONFIG naming a file with [rely]"),
    case("config-password-in-file-is-masked", ["relay", "--config", "{config}"], 1, NO_SCHEMA,
         toml=f'[relay]\ndb = "{{pg_empty}}"\nkafka = "127.0.0.1:1"\n[kafka]\n"sasl.password" = "{PW}"\n'),
]


@pytest.mark.parametrize(("argv", "env", "toml", "code", "fragment"), CASES)
def test_cli_input(argv: list[str], env: dict[str, str], toml: str | bytes | None, code: int, fragment: str,
                   places: dict[str, str], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    if any("{pg_empty" in a for a in argv) or (isinstance(toml, str) and "{pg_empty" in toml):
        pg = request.getfixturevalue("pg_empty")
        places["pg_empty"] = pg
        places["pg_empty_heroku"] = "postgres://" + pg.split("://", 1)[1]
    if any("{my_empty" in a for a in argv):
        places["my_empty_plain"] = "mysql://" + request.getfixturevalue("my_empty").split("://", 1)[1]
    if toml is not None:
        data = toml.encode() if isinstance(toml, str) else toml
        for key, value in places.items():
            data = data.replace(f"{{{key}}}".encode(), value.encode())
        Path(places["config"]).write_bytes(data)
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(**places))
    args = [a.format(**places) if "{" in a else a for a in argv]
    result = run_cli(capsys, args)
    assert_clean(*result, code, fragment)


def test_status_on_a_typo_creates_no_file(places: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, ["status", "--db", places["missing"]])
    assert code == 2 and "no such database file" in err
    assert not Path(places["dir"], "typo.db").exists()
    code, out, _ = run_cli(capsys, ["db", "upgrade", "--db", places["missing"]])
    assert code == 0 and Path(places["dir"], "typo.db").exists(), out  # db upgrade may create it


@pytest.mark.parametrize("n", [pytest.param(
    3, id="cli-downgrade-base-refuses-to-drop-rows", marks=pytest.mark.catalogue(
        area="cli", input="db downgrade base on tables holding rows, without --yes",
    expected="exit 1: refusing to downgrade ... outbox_processed_messages 3 row(s) ... --yes; tables kept"))])
def test_downgrade_base_refuses_to_drop_rows(n: int, places: dict[str, str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{Path(places['dir']) / 'rows.db'}"
    migrations.upgrade(url)
    engine = sa.create_engine(url)
    from outbox import default_tables

    t = default_tables()
    with engine.begin() as c:
        now = dt.datetime.now(dt.timezone.utc)
        c.execute(t.processed.insert(), [{"consumer": "c", "message_id": f"m{i}", "processed_at": now}
                                         for i in range(n)])
    code, out, err = run_cli(capsys, ["db", "downgrade", "base", "--db", url])
    assert_clean(code, out, err, 1, "refusing to downgrade")
    assert "outbox_processed_messages 3 row(s)" in err and "--yes" in err
    assert sa.inspect(engine).has_table("outbox_processed_messages")
    code, out, err = run_cli(capsys, ["db", "downgrade", "base", "--db", url, "--yes"])
    assert code == 0 and "-> none" in out, err
    assert not sa.inspect(engine).has_table("outbox_processed_messages")
    engine.dispose()


@pytest.mark.parametrize("argv", [
    pytest.param(["status", "--db", "{ok}"], id="cli-broken-pipe-status", marks=pytest.mark.catalogue(
        area="cli", input="outbox status | (reader already gone)", expected="exit 141, nothing on stderr")),
    pytest.param(["relay", "--help"], id="cli-broken-pipe-help", marks=pytest.mark.catalogue(
        area="cli", input="outbox relay --help | (reader already gone)", expected="exit 141, nothing on stderr")),
])
def test_broken_pipe_exits_quietly(argv: list[str], places: dict[str, str]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "outbox", *[a.format(**places) for a in argv]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=places["dir"])
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


@pytest.mark.parametrize("where", [
    pytest.param("after", id="cli-log-level-after-the-sub-command", marks=pytest.mark.catalogue(
        area="cli", input="outbox status --db URL --log-level DEBUG", expected="exit 0, DEBUG accepted")),
])
def test_log_level_after_the_sub_command(where: str, places: dict[str, str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, ["status", "--db", places["ok"], "--log-level", "debug"])
    assert code == 0 and "pending:" in out, err
    import logging

    assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
    code, out, err = run_cli(capsys, ["--log-level", "WARNING", "status", "--db", places["ok"]])
    assert code == 0 and logging.getLogger().getEffectiveLevel() == logging.WARNING
