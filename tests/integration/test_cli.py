"""The operator commands on real databases: status, dead (outbox rows and consumer dead letters),
and the relay's settings from flags, environment and TOML."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from consumers import DedupConsumer, IncomingMessage
from outbox import ConfigurationError, Outbox, default_tables
from outbox.brokers.base import Outcome
from outbox.brokers.memory import MemoryPublisher
from outbox.cli import build_parser, main
from outbox.cli.relay import build
from outbox.config import RelayConfig
from outbox.relay import Relay

T = default_tables()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dead_rows(engine: sa.Engine) -> sa.Engine:
    box = Outbox()
    with Session(engine) as s, s.begin():
        box.add(s, "orders", {"n": 1}, key="a")
        box.add(s, "orders", {"n": 2}, key="b")
        box.add(s, "orders", {"n": 3}, key="a")  # waits behind n=1: same topic and key
    pub = MemoryPublisher()
    pub.fail(lambda r: r.key == "a", Outcome.FAILED, "MSG_SIZE_TOO_LARGE: 2,000,000 bytes")
    relay = Relay(engine, pub, config=RelayConfig(progress_interval=0))
    relay.drain()
    relay.close()
    return engine


def test_status_and_dead_commands(dead_rows: sa.Engine, db_url: str, capsys) -> None:
    # key "a": the first message is dead, so (strict ordering) the later one waits behind it
    code, out, _ = run_cli(capsys, "status", "--db", db_url)
    assert code == 0 and "dead:           1" in out and "pending:        1" in out and "partitions:     32" in out
    code, out, _ = run_cli(capsys, "status", "--db", db_url, "--json")
    st = json.loads(out)
    assert (st["pending"], st["dead"]) == (1, 1) and st["relays"] == []

    code, out, _ = run_cli(capsys, "dead", "list", "--db", db_url, "--json")
    rows = json.loads(out)
    assert code == 0 and [(r["topic"], r["key"]) for r in rows] == [("orders", "a")]
    assert "MSG_SIZE_TOO_LARGE" in rows[0]["last_error"]
    code, out, _ = run_cli(capsys, "dead", "list", "--db", db_url, "--topic", "invoices")
    assert code == 0 and "(none)" in out
    code, out, _ = run_cli(capsys, "dead", "show", "--db", db_url, str(rows[0]["id"]))
    assert code == 0 and '{"n":1}' in out and "MSG_SIZE_TOO_LARGE" in out

    code, _, err = run_cli(capsys, "dead", "requeue", "--db", db_url)
    assert code == 2 and "needs a filter" in err
    code, out, _ = run_cli(capsys, "dead", "requeue", "--db", db_url, "--topic", "orders")
    assert code == 0 and "requeued 1 message(s)" in out
    pub = MemoryPublisher()
    relay = Relay(dead_rows, pub, config=RelayConfig(progress_interval=0))
    assert relay.drain() == 2  # the requeued message, then the one that waited behind it
    relay.close()
    assert [json.loads(m.payload)["n"] for m in pub.snapshot()] == [1, 3]
    code, out, _ = run_cli(capsys, "dead", "purge", "--db", db_url, "--all", "--json")
    assert json.loads(out) == {"purged": 0}
    with dead_rows.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T.outbox)).scalar_one() == 0


class Picky(DedupConsumer):
    name = "cli.picky"
    max_attempts = 1
    fixed = False

    def handle(self, session, message):
        if not Picky.fixed:
            raise ValueError("cannot ship to the moon")
        session.execute(sa.text("SELECT 1"))
        return {"ok": True}


def test_dead_commands_for_consumer_dead_letters(engine: sa.Engine, db_url: str, capsys) -> None:
    msg = IncomingMessage(id="m-1", topic="orders", key="k", payload=b'{"x": 1}', headers={},
                          content_type="application/json")
    Picky.fixed = False
    outcomes = Picky().process_batch(engine, [msg])
    assert outcomes[0].status.value == "dead"
    code, out, _ = run_cli(capsys, "dead", "list", "--db", db_url, "--consumer", "cli.picky", "--json")
    rows = json.loads(out)
    assert len(rows) == 1 and "cannot ship to the moon" in rows[0]["error"]
    code, out, _ = run_cli(capsys, "dead", "requeue", "--db", db_url, "--consumer", "cli.picky", "--all")
    assert code == 0 and "requeued 1" in out
    Picky.fixed = True
    done = Picky().process_requeued(engine)
    assert [o.status.value for o in done] == ["processed"]
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(T.processed)).scalar_one() == 1


def test_relay_settings_precedence_flags_env_file(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "relay.toml"
    (tmp_path / "x.db").touch()
    cfg.write_text(
        f'[relay]\ndb = "sqlite:///{tmp_path / "x.db"}"\nkafka = "127.0.0.1:1"\nbatch_size = 10\nmax_attempts = 3\n'
        'ordering = "none"\n[kafka]\n"linger.ms" = 1\n'
    )
    monkeypatch.setenv("OUTBOX_RELAY_MAX_ATTEMPTS", "4")
    args = build_parser().parse_args(["relay", "--config", str(cfg), "--batch-size", "20"])
    engine, publisher, config = build(args)
    assert (config.batch_size, config.max_attempts, config.ordering) == (20, 4, "none")
    assert type(publisher).__name__ == "KafkaPublisher"
    engine.dispose()
    publisher.close(timeout=0.1)

    # values are validated after merging: a file setting fixed up on the command line is fine
    lazy = tmp_path / "lazy.toml"
    lazy.write_text("[relay]\nmin_poll_interval = 10\n")
    _, pub2, conf2 = build(build_parser().parse_args(
        ["relay", "--config", str(lazy), "--poll-interval", "20", "--db", "sqlite://", "--kafka", "h:1"]))
    assert (conf2.min_poll_interval, conf2.poll_interval) == (10, 20)
    pub2.close(timeout=0.1)

    bad = tmp_path / "bad.toml"
    bad.write_text("[relay]\nbatchsize = 1\n")
    with pytest.raises(ConfigurationError, match=r"unknown key 'batchsize' in \[relay\]; known keys: .*batch_size"):
        build(build_parser().parse_args(["relay", "--config", str(bad), "--db", "sqlite://", "--kafka", "h:1"]))
    monkeypatch.delenv("OUTBOX_DB_URL", raising=False)
    monkeypatch.delenv("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("OUTBOX_RABBITMQ_URL", raising=False)
    with pytest.raises(ConfigurationError, match="no broker given"):
        build(build_parser().parse_args(["relay", "--db", "sqlite://"]))
    with pytest.raises(ConfigurationError, match="no database given"):
        build(build_parser().parse_args(["relay", "--kafka", "h:1"]))


def test_cli_errors_never_show_passwords(capsys) -> None:
    code, out, err = run_cli(capsys, "status", "--db", "postgresql+psycopg://app:hunter2@127.0.0.1:1/x")
    assert code != 0 and "hunter2" not in out + err and "error:" in err


# ----------------------------------------------------------------------------- masking, everywhere

PW = "Hunter2Pw"
#: the ways a password reaches the command line: URLs, librdkafka settings with and without '=', JSON
SECRETS = (
    f"postgresql+psycopg://app:{PW}@127.0.0.1:1/x",
    f"amqp://guest:{PW}@127.0.0.1:1/%2F",
    f"sasl.password={PW}",
    f"sasl.password {PW}",
    f'{{"ssl.key.password": "{PW}"}}',
)
DB = SECRETS[0]
CONSUMER_SRC = "from consumers import DedupConsumer\n\nclass C(DedupConsumer):\n    name = 'mask.c'\n\n" \
               "    def handle(self, session, message):\n        return None\n"
#: arguments that make each command end quickly (an unreachable database, --orders 0 for the demo)
BASELINE = {
    ("demo",): ["--orders", "0"],
    ("db", "upgrade"): ["--db", DB], ("db", "downgrade"): ["base", "--db", DB], ("db", "current"): ["--db", DB],
    ("db", "heads"): [], ("db", "sql"): ["--db", DB], ("db", "partitions"): ["--db", DB],
    ("relay",): ["--db", DB, "--kafka", "127.0.0.1:1", "-X", f"sasl.password={PW}"],
    ("status",): ["--db", DB],
    ("dead", "list"): ["--db", DB], ("dead", "show"): ["--db", DB, "1"], ("dead", "requeue"): ["--db", DB, "--all"],
    ("dead", "purge"): ["--db", DB, "--all"],
    ("consume",): ["mask_consumer:C", "--db", DB, "--kafka", "127.0.0.1:1", "--topic", "t", "--group", "g",
                   "-X", f"sasl.password={PW}"],
    ("purge", "processed"): ["--db", DB, "--older-than", "1d"],
    ("purge", "published"): ["--db", DB, "--older-than", "1d"],
}


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command with the words that reach it: the root, the groups (``db``, ``dead``,
    ``purge``) and the leaves."""
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.extend(_parsers(child, (*path, name)))
    return out


def _is_leaf(parser: argparse.ArgumentParser) -> bool:
    return not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def _leaves(parser: argparse.ArgumentParser) -> list[tuple[tuple[str, ...], Any]]:
    return [(path, p) for path, p in _parsers(parser) if _is_leaf(p)]


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


#: a secret typed as two words (``-X sasl.password PW`` without quotes): the password is a word of its own
SPLIT_SECRETS = (["sasl.password", PW], ["sasl.password=", PW], ["sasl.password", "=", PW], ["ssl.key.password:", PW])


def _masking_runs(daemon_db: str) -> list[tuple[str, list[str]]]:
    runs: list[tuple[str, list[str]]] = []
    leaves = _leaves(build_parser())
    for path, leaf in leaves:
        base = [daemon_db if a == DB and path in (("relay",), ("consume",)) else a for a in BASELINE[path]]
        cmd = " ".join(path)
        runs.append((cmd, [*path, *base]))
        for words in SPLIT_SECRETS:
            runs.append((f"{cmd} extra words {words}", [*path, *base, *words]))
        for secret in SECRETS:
            runs.append((f"{cmd} --dbb", [*path, *base, "--dbb", secret]))
            runs.append((f"{cmd} --dbb=", [*path, *base, f"--dbb={secret}"]))
            runs.append((f"{cmd} extra positional", [*path, *base, secret]))
            for action in leaf._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                if action.option_strings:
                    for flag in action.option_strings:
                        runs.append((f"{cmd} {flag}", [*path, *base, flag, secret]))
                        if flag.startswith("--"):
                            runs.append((f"{cmd} {flag}=", [*path, *base, f"{flag}={secret}"]))
                else:  # a positional: put the secret in its place
                    positional = [a for a in base if not a.startswith("-")]
                    args = list(base)
                    if positional and positional[0] in args and not args[args.index(positional[0]) - 1].startswith("-"):
                        args[args.index(positional[0])] = secret
                    runs.append((f"{cmd} {action.dest}", [*path, *args]))
        for action in _options(leaf):
            for flag in action.option_strings:
                for words in SPLIT_SECRETS:
                    runs.append((f"{cmd} {flag} {words}", [*path, *base, flag, *words]))
                    if words[0] == "sasl.password":  # the daemons' positional comes after the options
                        runs.append((f"{cmd} {flag} {words} first", [*path, flag, *words, *base]))
    # the options of the root and of the groups, given before the rest of the command
    for path, parser in _parsers(build_parser()):
        if _is_leaf(parser):
            continue
        for leaf_path, _ in leaves:
            if leaf_path[:len(path)] != path:
                continue
            base = [daemon_db if a == DB and leaf_path in (("relay",), ("consume",)) else a
                    for a in BASELINE[leaf_path]]
            rest = list(leaf_path[len(path):])
            for action in _options(parser):
                for flag in action.option_strings:
                    for secret in SECRETS:
                        runs.append((f"{' '.join(path)} {flag} before {' '.join(leaf_path)}",
                                     [*path, flag, secret, *rest, *base]))
                        runs.append((f"{' '.join(path)} {flag}= before {' '.join(leaf_path)}",
                                     [*path, f"{flag}={secret}", *rest, *base]))
                    for words in SPLIT_SECRETS:
                        runs.append((f"{' '.join(path)} {flag} {words} before {' '.join(leaf_path)}",
                                     [*path, flag, *words, *rest, *base]))
        runs.append((f"{' '.join(path) or 'outbox'} secret as the sub-command", [*path, SECRETS[0]]))
    # the JSON log format on every command: its own formatter, its own error line
    for path, _ in leaves:
        base = [daemon_db if a == DB and path in (("relay",), ("consume",)) else a for a in BASELINE[path]]
        for extra in ([], ["--dbb", SECRETS[0]], [SECRETS[2]], SPLIT_SECRETS[0]):
            runs.append((f"--log-format json {' '.join(path)} {extra}", ["--log-format", "json", *path, *base, *extra]))
    return runs


def _env_names(parser: argparse.ArgumentParser) -> set[str]:
    """The environment variables a parser's --help names (``env OUTBOX_...``)."""
    import re

    return {name for a in parser._actions for name in re.findall(r"\benv ([A-Z][A-Z0-9_]+)", a.help or "")}


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_no_password_in_any_output(capsys, caplog, tmp_path, monkeypatch, fresh_database: str) -> None:
    """Every option and error path of every command, fed a password in every usual form: the
    password appears in no stdout, stderr or log record (issue 10, item 8).

    The one-shot commands get an unreachable database (port 1); the relay and consume, which wait
    for an unreachable database, get a reachable one without the toolkit's tables (trust
    authentication ignores the password in its URL), so each run ends with an error.
    """
    import signal

    from sqlalchemy.engine import make_url

    daemon_db = make_url(fresh_database).set(password=PW).render_as_string(hide_password=False)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mask_consumer.py").write_text(CONSUMER_SRC)
    for name in ("OUTBOX_DB_URL", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "OUTBOX_KAFKA_SERVERS", "KAFKA_BOOTSTRAP_SERVERS",
                 "OUTBOX_RABBITMQ_URL", "OUTBOX_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    config = tmp_path / "secret.toml"
    config.write_text(f'[relay]\ndb = "{DB}"\nkafka = "127.0.0.1:1"\nrelay_id = "sasl.password={PW}"\n'
                      f'[consume]\ndb = "{DB}"\nkafka = "127.0.0.1:1"\ntopics = ["t"]\ngroup = "g"\n'
                      f'batch_size = "sasl.password={PW}"\n[kafka]\n"sasl.password" = "{PW}"\n')
    runs = _masking_runs(daemon_db)
    runs += [("relay --config", ["relay", "--config", str(config)]),
             ("consume --config", ["consume", "mask_consumer:C", "--config", str(config)])]
    runs += _toml_runs(tmp_path, daemon_db)
    env_runs = _env_runs(daemon_db)
    checked = 0
    try:
        for what, argv in runs:
            checked += _check_masked(capsys, caplog, what, ["--log-level", "DEBUG", *argv])
        for env, what, argv in env_runs:
            with monkeypatch.context() as m:
                for var, value in env.items():
                    m.setenv(var, value)
                checked += _check_masked(capsys, caplog, what, ["--log-level", "DEBUG", *argv])
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert checked > 4000  # the walk found the options


def _daemon_settings() -> dict[str, tuple[Any, ...]]:
    from outbox.cli import consume as consume_cmd
    from outbox.cli import relay as relay_cmd

    return {"relay": relay_cmd.settings(), "consume": consume_cmd.settings()}


def _env_runs(daemon_db: str) -> list[tuple[dict[str, str], str, list[str]]]:
    """Every variable a command's --help names, and the older names its settings still read, set to a
    secret in turn; the database comes from OUTBOX_DB_URL (unless that is the one under test)."""
    daemons = _daemon_settings()
    runs = []
    for path, leaf in _leaves(build_parser()):
        names = _env_names(leaf) | {v for s in daemons.get(path[0], ()) for v in s.env}
        base = list(BASELINE[path])
        if "--db" in base:
            del base[base.index("--db"):base.index("--db") + 2]
        db = daemon_db if path[0] in daemons else DB
        for var in sorted(names):
            for secret in SECRETS:
                env = {"OUTBOX_DB_URL": db, var: secret}
                runs.append((env, f"{' '.join(path)} with {var}={secret!r}", [*path, *base]))
        # --help, every variable set to a secret (defaults read from the environment must not show)
        runs.append(({var: SECRETS[0] for var in names}, f"{' '.join(path)} --help", [*path, "--help"]))
    return runs


def _toml_runs(tmp_path: Any, daemon_db: str) -> list[tuple[str, list[str]]]:
    """Every key of the daemons' TOML tables, and the broker tables, holding a secret in turn."""
    runs = []
    daemons = _daemon_settings()
    base = {"relay": ["relay"], "consume": ["consume", "mask_consumer:C"]}
    need = {"relay": {"db": daemon_db, "kafka": "127.0.0.1:1"},
            "consume": {"db": daemon_db, "kafka": "127.0.0.1:1", "topics": ["t"], "group": "g"}}
    n = 0
    for table, settings in daemons.items():
        keys = sorted(s.toml for s in settings if s.toml)
        assert len(keys) > 10, keys
        for key in keys:
            for secret in (SECRETS[0], SECRETS[2], SECRETS[3]):
                values = {**need[table], key: secret}
                body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                n += 1
                path = tmp_path / f"secret-{n}.toml"
                path.write_text(f"[{table}]\n{body}")
                runs.append((f"{table} --config with {key} = {secret!r}", [*base[table], "--config", str(path)]))
        for broker_table in ("kafka", "rabbitmq"):
            for key, value in (("sasl.password", PW), ("url", SECRETS[1]), ("sasl.username", SECRETS[3])):
                body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in need[table].items())
                n += 1
                path = tmp_path / f"secret-{n}.toml"
                path.write_text(f"[{table}]\n{body}[{broker_table}]\n{json.dumps(key)} = {json.dumps(value)}\n")
                runs.append((f"{table} --config with [{broker_table}] {key}", [*base[table], "--config", str(path)]))
    return runs


def _check_masked(capsys, caplog, what: str, argv: list[str]) -> int:
    """One run; a relay or consumer still waiting for the unreachable database after 5 s gets SIGTERM."""
    import os
    import signal
    import threading

    caplog.clear()
    signal.signal(signal.SIGTERM, lambda *_: None)  # the commands install their own; a late timer hits this one
    timer = threading.Timer(5.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        timer.cancel()
    out, err = capsys.readouterr()
    text = out + err + caplog.text
    assert PW not in text, f"{what}: password shown\n$ outbox {' '.join(argv)}\n{text}"
    assert "Traceback" not in text, f"{what}: traceback\n{text}"
    assert code is not None
    return 1


def test_a_new_relay_config_field_becomes_a_flag_a_variable_and_a_toml_key() -> None:
    """A plain field with a type and a docstring is all the settings layer needs."""
    import dataclasses

    from outbox.config import Setting, settings_of

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Extended(RelayConfig):
        group: str | None = None
        """Relay group this relay belongs to."""
        topics: tuple[str, ...] = ()
        """Topics this relay publishes."""

    by_name = {s.name: s for s in settings_of(Extended)}
    group, topics = by_name["group"], by_name["topics"]
    assert (group.kind, group.flags, group.env, group.toml) == ("str", ("--group",), ("OUTBOX_RELAY_GROUP",), "group")
    assert group.help == "Relay group this relay belongs to."
    assert topics.kind == "list" and topics.parse("a, b,,c", "x") == ("a", "b", "c")
    assert by_name["batch_size"].help == "Rows claimed and published per round."
    assert isinstance(by_name["lease_ttl"], Setting) and by_name["lease_ttl"].kind == "float"


def test_readme_toml_example_is_accepted_by_both_commands(tmp_path, monkeypatch) -> None:
    import re
    from pathlib import Path

    from outbox.cli import consume as consume_cmd
    from outbox.cli._settings import load_config_file, resolve

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert block, "no TOML example in the README"
    cfg = tmp_path / "outbox.toml"
    cfg.write_text(block.group(1))
    for name in ("OUTBOX_DB_URL", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "OUTBOX_KAFKA_SERVERS", "KAFKA_BOOTSTRAP_SERVERS",
                 "OUTBOX_RABBITMQ_URL"):
        monkeypatch.delenv(name, raising=False)
    engine, _publisher, config = build(build_parser().parse_args(["relay", "--config", str(cfg)]))
    assert config.batch_size == 500 and engine.url.drivername == "postgresql+psycopg"
    engine.dispose()
    args = build_parser().parse_args(["consume", "x:C", "--config", str(cfg)])
    values = resolve(consume_cmd.settings(), args, table="consume", file=load_config_file(str(cfg)), file_label="f")
    assert values["topics"] == ("orders",) and values["group"] == "billing"


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql", "mariadb"])
def test_a_missing_table_met_mid_command_says_to_run_db_upgrade(dialect_name, database_urls) -> None:
    """The CLI's last-resort translation recognises a missing table the way the writer's does
    (outbox._sqlerrors.missing_table), and nothing else that merely 'does not exist'."""
    from outbox.cli import _database_error

    engine = sa.create_engine(database_urls[dialect_name], poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1 FROM outbox_table_that_is_not_there"))
    except sa.exc.DBAPIError as exc:
        text = _database_error(exc, argparse.Namespace())
    else:  # pragma: no cover
        pytest.fail("the query should fail")
    finally:
        engine.dispose()
    assert "run `outbox db upgrade --db URL` first" in text, text
    with engine.connect() as conn:
        try:
            conn.execute(sa.text("SELECT no_such_column FROM (SELECT 1 AS x) AS t"))
        except sa.exc.DBAPIError as exc:
            other = _database_error(exc, argparse.Namespace())
    assert other.startswith("database error: ") and "db upgrade" not in other, other
    engine.dispose()


@pytest.mark.parametrize("command", ["relay", "consume"])
def test_both_commands_read_x_with_one_parser(command: str, tmp_path, monkeypatch, capsys) -> None:
    """Issue 10 item 13: the relay and consume had two KEY=VALUE parsers that stripped whitespace
    differently. Both now strip it around the key and the value, and librdkafka gets the bare key."""
    from outbox import migrations

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mask_consumer.py").write_text(CONSUMER_SRC)
    db = f"sqlite:///{tmp_path / 'x.db'}"
    migrations.upgrade(db)
    for name in ("OUTBOX_DB_URL", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "OUTBOX_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    base = {"relay": ["relay"], "consume": ["consume", "mask_consumer:C", "--topic", "t", "--group", "g"]}[command]
    code, _, err = run_cli(capsys, *base, "--db", db, "--kafka", "127.0.0.1:1", "-X", "  bogus.prop  =  1  ")
    assert code == 2 and 'No such configuration property: "bogus.prop"' in err, err
    code, _, err = run_cli(capsys, *base, "--db", db, "--kafka", "127.0.0.1:1", "-X", " socket.timeout.ms = nope ")
    assert code == 2 and 'Invalid value for configuration property "socket.timeout.ms"' in err, err


@pytest.mark.parametrize("dialect_name", ["sqlite"], indirect=True)
def test_the_relay_daemon_freezes_its_start_up_objects_before_the_loop(engine: sa.Engine, db_url: str,
                                                                        monkeypatch) -> None:
    """`outbox relay` runs gc.freeze() before its loop: a full collection then skips everything
    start-up made, instead of pausing the publish loop for 30 ms or more to walk it. And it raises the
    young generation's threshold, so a batch's records, alive until the batch ends, are not walked
    again and again while it is built (1.3-2.3 us of collection a message to Kafka at the default 700)."""
    import gc

    seen: list[tuple[int, int]] = []

    def fake_run(self: Relay) -> Any:
        seen.append((gc.get_freeze_count(), gc.get_threshold()[0]))
        return self.stats

    monkeypatch.setattr(Relay, "run", fake_run)
    assert gc.get_freeze_count() == 0
    before = gc.get_threshold()
    try:
        assert main(["relay", "--db", db_url, "--kafka", "127.0.0.1:1"]) == 0
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
        gc.set_threshold(*before)
    assert seen and seen[0][0] > 10_000  # the modules, SQLAlchemy and the relay's own objects
    assert seen[0][1] >= 10_000


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_status_and_dead_commands_on_times_no_datetime_holds(engine: sa.Engine, db_url: str, capsys) -> None:
    """A hand-written 'infinity' in created_at / available_at: status and dead list/show still answer,
    showing the value as PostgreSQL writes it, and the relay marks both rows dead with the reason."""
    box = Outbox()
    with Session(engine) as s, s.begin():
        bad = box.add(s, "orders", {"n": 1}, key="a")
        late = box.add(s, "orders", {"n": 2}, key="b")
    o = T.outbox
    with engine.begin() as c:
        c.execute(sa.text("UPDATE outbox_messages SET created_at = 'infinity' WHERE message_id = :m"), {"m": bad})
        c.execute(sa.text("UPDATE outbox_messages SET available_at = 'infinity', attempts = 1 WHERE message_id = :m"),
                  {"m": late})
    code, out, err = run_cli(capsys, "status", "--db", db_url, "--json")
    assert code == 0, err
    assert json.loads(out)["pending"] == 2
    relay = Relay(engine, MemoryPublisher(), config=RelayConfig(progress_interval=0))
    relay.drain()
    relay.close()
    code, out, err = run_cli(capsys, "status", "--db", db_url)
    assert code == 0 and "dead:           2" in out, (out, err)  # both: neither would ever be sent
    code, out, err = run_cli(capsys, "dead", "list", "--db", db_url, "--json")
    assert code == 0, err
    rows = {r["message_id"]: r for r in json.loads(out)}
    assert rows[str(bad)]["created_at"] == "infinity" and "got 'infinity'" in rows[str(bad)]["last_error"]
    assert "available_at 'infinity' is never reached" in rows[str(late)]["last_error"]
    code, out, err = run_cli(capsys, "dead", "list", "--db", db_url)
    assert code == 0 and "infinity" in out, err
    with engine.connect() as c:
        rid = c.execute(sa.select(o.c.id).where(o.c.message_id == bad)).scalar_one()
    code, out, err = run_cli(capsys, "dead", "show", "--db", db_url, str(rid))
    assert code == 0 and "infinity" in out, err
