"""The ``outbox`` command. Each sub-command lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from .._logging import LOG_FORMATS, ContextFilter, JsonFormatter, MaskingFormatter, RateLimitFilter
from .._redact import forget_secret_words, mask_secrets, remember_secret_words
from .._sqlerrors import ADDED_COLUMNS, missing_column, missing_table
from ..errors import ConfigurationError, OutboxError
from ._common import one_line
from ._settings import GLOBAL_SETTINGS, MaskingArgumentParser, check_log_level, help_text

__all__ = ["main"]

#: sub-command modules, in the order ``outbox --help`` lists them
COMMAND_MODULES = ("demo", "db", "relay", "status", "dead", "consume", "purge")


#: loggers of libraries that are chatty at INFO (pika logs object reprs): WARNING unless --log-level DEBUG
QUIET_LOGGERS = ("pika", "kafka", "urllib3", "asyncio", "alembic.runtime.migration")

#: seconds within which a repeated identical warning or error is counted, not shown again
REPEAT_WINDOW = 30.0

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_format = "text"
_repeats: RateLimitFilter | None = None


def flush_repeats() -> None:
    """Log the counts of repeated lines not reported yet (a daemon's exit): nothing is hidden silently."""
    root = logging.getLogger()
    if _repeats is not None:
        for handler in root.handlers:
            if _repeats in handler.filters:
                _repeats.flush(handler)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """One stderr handler: text or JSON lines, passwords masked, repeats rate-limited, context attached."""
    global _format
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else MaskingFormatter(_TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    global _repeats
    # at DEBUG every line is shown (someone is debugging: the retry rhythm is what they look at)
    _repeats = RateLimitFilter(REPEAT_WINDOW) if logging.getLevelName(level.upper()) > logging.DEBUG else None
    if _repeats is not None:
        handler.addFilter(_repeats)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet = logging.getLevelName(level.upper()) > logging.DEBUG
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)


def check_log_format(text: str) -> str:
    fmt = str(text).strip().lower()
    if fmt not in LOG_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log format: use one of {', '.join(LOG_FORMATS)}")
    return fmt


def _add_log_level(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--log-level`` and ``--log-format`` (GLOBAL_SETTINGS) on ``parser`` and every sub-command below it
    (before or after the sub-command)."""
    checks = {"log_level": check_log_level, "log_format": check_log_format}
    for setting in GLOBAL_SETTINGS:
        if setting.flags[0] not in parser._option_string_actions:
            parser.add_argument(*setting.flags, dest=setting.name, default=default, type=checks[setting.name],
                                metavar=setting.metavar, help=help_text(setting))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_log_level(child, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = MaskingArgumentParser(
        prog="outbox",
        description="Transactional outbox and dedup consumers: tables, relay, consumers, dead letters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    _add_log_level(parser, None)
    return parser


def _silence_stdout() -> None:
    """The reader of our stdout went away (``outbox dead list | head``): drop what is still buffered."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _log_level(args: argparse.Namespace) -> str:
    if getattr(args, "log_level", None):
        return str(args.log_level)
    var = GLOBAL_SETTINGS[0].env[0]
    env = os.environ.get(var, "").strip()
    if not env:
        return "INFO"
    try:
        return check_log_level(env)
    except argparse.ArgumentTypeError as exc:
        raise ConfigurationError(f"environment variable {var}: {exc}") from None


def _log_format(args: argparse.Namespace) -> str:
    if getattr(args, "log_format", None):
        return str(args.log_format)
    var = GLOBAL_SETTINGS[1].env[0]
    env = os.environ.get(var, "").strip()
    if not env:
        return "text"
    try:
        return check_log_format(env)
    except argparse.ArgumentTypeError as exc:
        raise ConfigurationError(f"environment variable {var}: {exc}") from None


def _error(text: str) -> None:
    """The one line of a failed command: ``error: ...``, or a JSON log line under --log-format json."""
    if _format == "json":
        logging.getLogger("outbox.cli").error("%s", text)
    else:
        print(f"error: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``outbox`` command: one line on stderr for every error, 2 for usage errors, never a traceback."""
    remember_secret_words(sys.argv[1:] if argv is None else argv)  # `-X sasl.password PW`, quotes forgotten
    try:
        return _main(argv)
    except BrokenPipeError:
        _silence_stdout()
        return 128 + 13  # as if killed by SIGPIPE, the way `yes | head` ends, without a traceback
    finally:
        forget_secret_words()


def _main(argv: Sequence[str] | None) -> int:
    global _format
    _format = "text"
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        words = list(sys.argv[1:] if argv is None else argv)
        if exc.code == 2 and "status" in words and "--check" in words:
            return 3  # a monitoring check that cannot run is UNKNOWN, not CRITICAL
        raise
    try:
        fmt = _log_format(args)
        _format = fmt
        setup_logging(_log_level(args), fmt)
        try:
            code = int(args.func(args) or 0)
        finally:
            flush_repeats()
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's shutdown
        return code
    except BrokenPipeError:
        raise
    except ConfigurationError as exc:
        _error(mask_secrets(exc))
        return 2
    except OutboxError as exc:
        _error(mask_secrets(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except sa.exc.DBAPIError as exc:
        _error(_database_error(exc, args))
        return 1
    except Exception as exc:  # translate driver errors into one readable line, never a password
        _error(f"{type(exc).__name__}: {one_line(exc)}")
        return 1


def _database_error(exc: sa.exc.DBAPIError, args: argparse.Namespace) -> str:
    """A driver error in one line; a missing table says what to run."""
    text = one_line(exc)
    column = missing_column(str(exc))
    if column is not None:
        return (f"{text}: the database is at an older revision of the toolkit's schema (column {column[1]!r} "
                f"comes with {ADDED_COLUMNS[column[1]]}), run `outbox db upgrade --db URL` first")
    if missing_table(str(exc)) is not None:
        return f"{text}: the toolkit's tables are missing, run `outbox db upgrade --db URL` first"
    return f"database error: {text}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
