"""The one settings layer of ``outbox relay`` and ``outbox consume``.

Every option is a :class:`~outbox.config.Setting`, declared once (type, default, help, environment
names, TOML key, flags); the relay's come from :class:`~outbox.config.RelayConfig`'s fields. Both
commands resolve them the same way: the command line, then the environment, then the command's
table of the ``--config`` TOML file, then the default. Both take ``-X KEY=VALUE`` (broker settings,
one parser) and ``--config FILE``. Unknown tables and keys in the file are errors that name the
known ones; old environment names still work, with a warning.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

from .._redact import mask_secrets
from ..config import Setting, load_toml
from ..errors import ConfigurationError

__all__ = [
    "BROKER_SETTINGS",
    "COMMON_SETTINGS",
    "CONNECTION_SETTINGS",
    "FILE_TABLES",
    "GLOBAL_SETTINGS",
    "LOG_LEVELS",
    "OBSERVABILITY_SETTINGS",
    "MaskingArgumentParser",
    "Resolved",
    "add_common_options",
    "add_settings",
    "check_log_level",
    "choose_broker",
    "help_text",
    "load_config_file",
    "parse_kv",
    "resolve",
]

log = logging.getLogger("outbox.cli")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: the tables a ``--config`` file may hold; each command reads its own and the broker tables
FILE_TABLES = {
    "relay": "settings of `outbox relay` (RelayConfig fields, db, kafka, rabbitmq)",
    "consume": "settings of `outbox consume` (db, kafka, rabbitmq, topics, group, queue, batch_size, ...)",
    "kafka": "librdkafka settings, as with -X (both commands)",
    "rabbitmq": "RabbitMQ publisher options of the relay, as with -X",
}


class MaskingArgumentParser(argparse.ArgumentParser):
    """argparse, but its errors (which quote the user's arguments) go through the masking."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(mask_secrets(message))
        sys.exit(status)

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (file or sys.stderr).write(mask_secrets(message))


def check_log_level(text: str) -> str:
    level = str(text).strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level: use one of {', '.join(LOG_LEVELS)}")
    return level


def _arg_type(setting: Setting, flag: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return setting.parse(text, "")
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = setting.kind  # argparse names the type in some messages
    return parse


def help_text(setting: Setting) -> str:
    """The ``--help`` line of a setting: its help, default, environment variable and TOML key."""
    parts = [setting.help.rstrip(".")] if setting.help else []
    if setting.default not in (None, ()):
        parts.append(f"default {setting.default}")
    if setting.env:
        parts.append(f"env {setting.env[0]}")
    if setting.toml:
        parts.append(f"TOML {setting.toml}")
    return "; ".join(parts).replace("%", "%%")


def add_settings(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """A flag for every setting that has one. Flags already on the parser are left as they are."""
    taken = parser._option_string_actions  # argparse keeps no public view of this
    for s in settings:
        flags = [f for f in s.flags if f not in taken]
        if s.kind == "bool":
            if flags:
                parser.add_argument(*flags, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                                    help=help_text(s))
            negation = [f for f in s.negation if f not in taken]
            if negation:
                parser.add_argument(*negation, dest=s.name, action="store_false", default=None,
                                    help=f"the same as --no-{s.name.replace('_', '-')}")
            continue
        if not flags:
            continue
        if s.kind == "list":
            parser.add_argument(*flags, dest=s.name, action="append", default=None, metavar=s.metavar,
                                type=_arg_type(s, flags[0]), help=help_text(s) + " (repeatable, or comma-separated)")
        else:
            parser.add_argument(*flags, dest=s.name, default=None, metavar=s.metavar or s.name.upper(),
                                type=_arg_type(s, flags[0]), choices=None, help=help_text(s))


def add_common_options(parser: argparse.ArgumentParser, *, x_aliases: Sequence[str] = ()) -> None:
    """``--config FILE`` and ``-X KEY=VALUE``, the same on both commands (declared in COMMON_SETTINGS)."""
    config, options = COMMON_SETTINGS
    parser.add_argument(*config.flags, metavar=config.metavar, default=None, help=help_text(config))
    parser.add_argument(*options.flags, *x_aliases, dest="broker_options", action="append", default=[],
                        metavar=options.metavar, help=help_text(options))


def choose_broker(values: Any) -> tuple[str, str]:
    """``(transport name, target)`` from ``--broker NAME --broker-url TARGET`` or a shortcut
    (``--kafka SERVERS``, ``--rabbitmq URL``); pops the four settings from ``values``."""
    name, url = values.pop("broker", None), values.pop("broker_url", None)
    kafka, rabbit = values.pop("kafka", None), values.pop("rabbitmq", None)
    given = [n for n, v in (("--broker", name), ("--kafka", kafka), ("--rabbitmq", rabbit)) if v]
    if len(given) > 1:
        raise ConfigurationError(f"choose one broker: {' or '.join(given)}, not {'both' if len(given) == 2 else 'all'}")
    if kafka:
        return "kafka", str(kafka)
    if rabbit:
        return "rabbitmq", str(rabbit)
    if not name:
        raise ConfigurationError("no broker given: pass --kafka SERVERS, --rabbitmq URL or --broker NAME "
                                 "--broker-url TARGET")
    from ..transports import get

    transport = get(str(name))  # an unknown name lists the registered ones
    if not url and getattr(transport, "needs_target", True):
        raise ConfigurationError(f"--broker {name} needs --broker-url TARGET (or OUTBOX_BROKER_URL)")
    return str(name), str(url or "")


def parse_kv(pairs: Iterable[str], option: str = "-X") -> dict[str, str]:
    """``KEY=VALUE`` strings -> dict; whitespace around key and value is stripped.

    Errors name only the key: a value can be a password (``-X "sasl.password PW"``).
    """
    out: dict[str, str] = {}
    for item in pairs:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        words = key.split()
        if not sep:
            shown = f"{words[0]!r}" if words else "''"
            raise ConfigurationError(f"{option} takes KEY=VALUE; no '=' in the one starting {shown}")
        if not key:
            raise ConfigurationError(f"{option} takes KEY=VALUE, got an empty key")
        if len(words) > 1:
            raise ConfigurationError(
                f"{option} takes KEY=VALUE; a key has no spaces, see the one starting {words[0]!r}")
        out[key] = value.strip()
    return out


def load_config_file(path: str | None) -> dict[str, dict[str, Any]]:
    """The tables of a ``--config`` file; unknown tables and top-level keys are errors."""
    if not path:
        path = os.environ.get("OUTBOX_CONFIG") or None
    if not path:
        return {}
    data = load_toml(path)
    known = ", ".join(f"[{t}]" for t in sorted(FILE_TABLES))
    for key, value in data.items():
        if key not in FILE_TABLES:
            what = "table" if isinstance(value, dict) else "top-level key"
            hint = f"[{key}]" if isinstance(value, dict) else repr(key)
            raise ConfigurationError(f"config file {path}: unknown {what} {hint}; known tables: {known}")
    return {k: dict(v) for k, v in data.items()}


class Resolved(dict[str, Any]):
    """Settings by name, with where each came from (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[str, str] = {}

    def explain(self, exc: ConfigurationError) -> ConfigurationError:
        """``batch_size must be ...`` -> ``... (from OUTBOX_RELAY_BATCH_SIZE)``."""
        text = str(exc)
        for name, source in self.sources.items():
            if text.startswith(f"{name} ") and source != name:
                return ConfigurationError(f"{text} (set by {source})")
        return exc


def resolve(settings: Sequence[Setting], args: argparse.Namespace, *, table: str,
            file: Mapping[str, Mapping[str, Any]], file_label: str | None,
            environ: Mapping[str, str] | None = None) -> Resolved:
    """The value of every setting that was given: command line, then environment, then file."""
    env = os.environ if environ is None else environ
    section = dict(file.get(table, {}))
    by_key = {s.toml: s for s in settings if s.toml}
    for key in section:
        name = str(key).replace("-", "_")
        if name not in by_key:
            raise ConfigurationError(f"config file {file_label}: unknown key {key!r} in [{table}]; known keys: "
                                     f"{', '.join(sorted(by_key))}")
    file_values = {str(k).replace("-", "_"): v for k, v in section.items()}
    out = Resolved()
    for s in settings:
        cli = getattr(args, s.name, None)
        if cli is not None:
            flag = "/".join(s.flags + s.negation) or s.name
            if isinstance(cli, str) and s.kind not in ("str", "any"):  # a flag declared by hand, not by add_settings
                cli = s.parse(cli, flag)
            elif s.kind == "list" and isinstance(cli, list):  # repeated flags, each possibly comma-separated
                cli = tuple(i for part in cli for i in (part if isinstance(part, tuple) else s.parse(part, flag)))
            out[s.name] = cli
            out.sources[s.name] = flag
            continue
        for i, var in enumerate(s.env):
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            if i > 0:
                log.warning("environment variable %s is deprecated: use %s", var, s.env[0])
            out[s.name] = s.parse(raw, f"environment variable {var}")
            out.sources[s.name] = f"environment variable {var}"
            break
        else:
            if s.toml and s.toml in file_values:
                where = f"[{table}] {s.toml} in {file_label}"
                out[s.name] = s.parse(file_values[s.toml], where)
                out.sources[s.name] = where
    return out


# --------------------------------------------------------------------------- shared declarations

CONNECTION_SETTINGS = (
    Setting("db", help="SQLAlchemy database URL", env=("OUTBOX_DB_URL",), toml="db", flags=("--db",),
            metavar="URL"),
    Setting("table_prefix", help="prefix of the toolkit's table names (default 'outbox')",
            env=("OUTBOX_TABLE_PREFIX",), toml="table_prefix", flags=("--table-prefix",), metavar="PREFIX"),
    Setting("schema", help="database schema of the tables", env=("OUTBOX_DB_SCHEMA",), toml="schema",
            flags=("--schema",), metavar="SCHEMA"),
)

BROKER_SETTINGS = (
    Setting("broker", help="transport name: kafka, rabbitmq, memory or one a package registers "
            "(entry point group outboxkit.transports)", env=("OUTBOX_BROKER",), toml="broker", flags=("--broker",),
            metavar="NAME"),
    Setting("broker_url", help="where --broker connects: Kafka bootstrap servers, an AMQP URL, ...",
            env=("OUTBOX_BROKER_URL",), toml="broker_url", flags=("--broker-url",), metavar="TARGET"),
    Setting("kafka", help="Kafka bootstrap servers (shortcut for --broker kafka --broker-url SERVERS)",
            env=("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "OUTBOX_KAFKA_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"),
            toml="kafka", flags=("--kafka",), metavar="SERVERS"),
    Setting("rabbitmq", help="RabbitMQ URL, amqp://... (shortcut for --broker rabbitmq --broker-url URL)",
            env=("OUTBOX_RABBITMQ_URL",), toml="rabbitmq",
            flags=("--rabbitmq",), metavar="URL"),
)

#: options of the ``outbox`` command itself, given before or after the sub-command
GLOBAL_SETTINGS = (
    Setting("log_level", help="log level: DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)",
            env=("OUTBOX_LOG_LEVEL",), flags=("--log-level",), choices=LOG_LEVELS, metavar="LEVEL"),
    Setting("log_format", help="log format: text, or json for one JSON object per line (default text)",
            env=("OUTBOX_LOG_FORMAT",), flags=("--log-format",), choices=("text", "json"), metavar="FORMAT"),
)

#: options both daemons take, with no TOML key (the file is the one that holds the keys)
COMMON_SETTINGS = (
    Setting("config", help="TOML file with [relay], [consume], [kafka], [rabbitmq] and [NAME] (other transport) tables",
            env=("OUTBOX_CONFIG",), flags=("--config",), metavar="FILE"),
    Setting("broker_options", kind="list", help="transport setting: a librdkafka property for Kafka, a publisher "
            "option for RabbitMQ (repeatable; overrides the [kafka] / [rabbitmq] / [NAME] table)",
            flags=("-X", "--broker-option"), metavar="KEY=VALUE"),
)

OBSERVABILITY_SETTINGS = (
    Setting("http", help="serve /metrics, /healthz and /readyz on HOST:PORT (off by default; a bare PORT binds "
            "127.0.0.1; needs pip install 'outboxkit[metrics]')", env=("OUTBOX_HTTP",), toml="http",
            flags=("--http",), metavar="HOST:PORT"),
    Setting("metrics_interval", kind="float", positive=True, default=5.0,
            help="seconds between the database queries behind the row gauges and readiness",
            env=("OUTBOX_METRICS_INTERVAL",), toml="metrics_interval", flags=("--metrics-interval",),
            metavar="SECONDS"),
)
