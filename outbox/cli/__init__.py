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

from .._redact import mask_secrets
from .._sqlerrors import ADDED_COLUMNS, missing_column, missing_table
from ..errors import ConfigurationError, OutboxError
from ._common import one_line
from ._settings import MaskingArgumentParser, check_log_level

__all__ = ["main"]

#: sub-command modules, in the order ``outbox --help`` lists them
COMMAND_MODULES = ("demo", "db", "relay", "status", "dead", "consume", "purge")


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _add_log_level(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--log-level`` on ``parser`` and every sub-command below it (before or after the sub-command)."""
    if "--log-level" not in parser._option_string_actions:
        parser.add_argument("--log-level", default=default, type=check_log_level, metavar="LEVEL",
                            help="DEBUG, INFO, WARNING or ERROR (default INFO, env OUTBOX_LOG_LEVEL)")
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
    if args.log_level:
        return str(args.log_level)
    env = os.environ.get("OUTBOX_LOG_LEVEL", "").strip()
    if not env:
        return "INFO"
    try:
        return check_log_level(env)
    except argparse.ArgumentTypeError as exc:
        raise ConfigurationError(f"environment variable OUTBOX_LOG_LEVEL: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """The ``outbox`` command: one line on stderr for every error, 2 for usage errors, never a traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        _silence_stdout()
        return 128 + 13  # as if killed by SIGPIPE, the way `yes | head` ends, without a traceback


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(_log_level(args))
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's shutdown
        return code
    except BrokenPipeError:
        raise
    except ConfigurationError as exc:
        print(f"error: {mask_secrets(exc)}", file=sys.stderr)
        return 2
    except OutboxError as exc:
        print(f"error: {mask_secrets(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except sa.exc.DBAPIError as exc:
        print(f"error: {_database_error(exc, args)}", file=sys.stderr)
        return 1
    except Exception as exc:  # translate driver errors into one readable line, never a password
        print(f"error: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
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
