"""Validation of names that end up in SQL (tables, schemas) or in keys (consumer names)."""

from __future__ import annotations

import re

from .errors import InvalidIdentifier

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_CONSUMER = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


def identifier(value: object, what: str = "identifier") -> str:
    """Return ``value`` if it is a plain SQL identifier, else raise :class:`InvalidIdentifier`."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise InvalidIdentifier(
            f"{what} {value!r} is not a valid identifier: use 1-63 letters, digits and underscores, "
            "not starting with a digit"
        )
    return value


def consumer_name(value: object) -> str:
    """Validate a dedup consumer name (stored as data, shown in the CLI)."""
    if not isinstance(value, str) or not _CONSUMER.match(value):
        raise InvalidIdentifier(
            f"consumer name {value!r} is not valid: use 1-200 letters, digits, '.', '_', ':' or '-'"
        )
    return value
