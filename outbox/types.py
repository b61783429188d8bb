"""Portable column types. The concrete type per database comes from ``outbox.dialects``."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect as SADialect

__all__ = ["ExactString", "JSONDocument", "MessageUUID", "Payload", "UTCDateTime"]


def _with_variants(base: sa.types.TypeEngine[Any], kind: str) -> sa.types.TypeEngine[Any]:
    from .dialects.mysql import MySQLDialect
    from .dialects.postgresql import PostgreSQLDialect
    from .dialects.sqlite import SQLiteDialect

    result = base
    for impl, names in (
        (PostgreSQLDialect, ("postgresql",)),
        (MySQLDialect, ("mysql", "mariadb")),
        (SQLiteDialect, ("sqlite",)),
    ):
        variant = impl.type_variants().get(kind)
        if variant is not None:
            result = result.with_variant(variant, *names)
    return result


def Payload() -> sa.types.TypeEngine[bytes]:
    """Message bytes: BYTEA / LONGBLOB / BLOB."""
    return _with_variants(sa.LargeBinary(), "payload")


def JSONDocument() -> sa.types.TypeEngine[Any]:
    """A JSON document: JSONB on PostgreSQL, JSON elsewhere."""
    return _with_variants(sa.JSON(none_as_null=True), "json")  # None is SQL NULL, not JSON null


def MessageUUID() -> sa.types.TypeEngine[Any]:
    """A UUID: native on PostgreSQL, CHAR(32) elsewhere."""
    return _with_variants(sa.Uuid(as_uuid=True), "uuid")


class ExactString(sa.types.TypeDecorator[str]):
    """``VARCHAR(length)`` that compares byte for byte: ids, keys and names whose equality means identity.

    ``ExactString(255)``. Case, accents and trailing spaces all count, on every database:
    PostgreSQL and SQLite compare text that way already; MySQL/MariaDB get a binary NO PAD
    collation (see :meth:`outbox.dialects.Dialect.exact_string`), so a unique key never takes
    ``"abc"`` after ``"ABC"`` for a duplicate.

    ``byte_order=True`` also *sorts* byte for byte (``COLLATE "C"`` on PostgreSQL, see
    :meth:`outbox.dialects.Dialect.byte_order_string`): for the dedup keys, which are inserted
    into a unique index once per message and never shown sorted. Under a libc collation such as
    ``C.UTF-8`` or ``en_US.UTF-8`` every comparison of a btree insert goes through ``strcoll``.
    """

    impl = sa.String
    cache_ok = True

    def __init__(self, length: int | None = None, byte_order: bool = False) -> None:
        super().__init__(length)
        self.byte_order = byte_order

    def load_dialect_impl(self, dialect: SADialect) -> sa.types.TypeEngine[Any]:
        from . import dialects

        length = self.impl_instance.length
        d = dialects.dialect_for(dialect.name)
        variant = d.exact_string(length, dialect) if length is not None else None
        if variant is None and self.byte_order and length is not None:
            variant = d.byte_order_string(length, dialect)
        return dialect.type_descriptor(variant if variant is not None else sa.String(length))


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every database.

    PostgreSQL stores ``timestamptz``; MySQL/MariaDB ``DATETIME(6)`` and SQLite text hold naive UTC.
    Values always come back aware, in UTC. Naive values are refused on the way in.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: SADialect) -> sa.types.TypeEngine[Any]:
        from . import dialects

        variant = dialects.dialect_for(dialect.name).type_variants().get("timestamp")
        return dialect.type_descriptor(variant if variant is not None else sa.DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: SADialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; attach a timezone")
        value = value.astimezone(dt.timezone.utc)
        if dialect.name != "postgresql":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: SADialect) -> dt.datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # pragma: no cover - raw SQLite text
            value = dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)
