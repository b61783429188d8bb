"""The per-dialect interface. Each database implements it once, in its own module."""

from __future__ import annotations

from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Insert


class Dialect:
    """Database-specific behaviour: column types, insert-if-absent, row claiming, notifications."""

    name: ClassVar[str] = "base"
    #: ``SELECT ... FOR UPDATE SKIP LOCKED`` is available, so several relays can share the table.
    supports_skip_locked: ClassVar[bool] = False
    #: several relay processes may run at once.
    supports_concurrent_relays: ClassVar[bool] = False
    #: LISTEN/NOTIFY wake-ups.
    supports_notify: ClassVar[bool] = False

    # --- column types -------------------------------------------------------------
    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        """Concrete types for the portable ``payload``, ``json``, ``uuid`` and ``timestamp`` kinds."""
        return {}

    # --- statements ----------------------------------------------------------------
    def insert_ignore(self, table: sa.Table) -> Insert:
        """An INSERT that silently skips rows violating a unique constraint."""
        raise NotImplementedError

    def lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        """Apply the row-claiming lock to a SELECT (``FOR UPDATE SKIP LOCKED`` where available)."""
        return select

    def check_server(self, connection: Connection) -> None:
        """Raise :class:`~outbox.errors.UnsupportedDatabase` if the server is too old for the relay."""

    def notify(self, connection: Connection, channel: str) -> None:  # pragma: no cover - default no-op
        """Send a wake-up notification in the current transaction, where supported."""

    def begin_claim(self, connection: Connection) -> None:
        """Hook run at the start of a claim transaction (e.g. SQLite's BEGIN IMMEDIATE)."""
