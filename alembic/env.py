"""Alembic environment for outboxkit's own tables.

Run through ``outbox db ...`` (or :mod:`outbox.migrations`), which passes the connection or URL,
the table names and the version table in ``config.attributes``. The toolkit keeps its own version
table (``outbox_alembic_version``) so it never collides with the application's ``alembic_version``.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import pool

from alembic import context
from outbox.migrations import VERSION_TABLE, tables_for_migration

config = context.config
tables = tables_for_migration()
target_metadata = tables.metadata
own = set(tables.names.all())


def include_object(obj, name, type_, reflected, compare_to):
    if type_ == "table":
        return name in own
    table = getattr(obj, "table", None)
    return table is None or table.name in own


def _configure(**kw) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=config.attributes.get("version_table", VERSION_TABLE),
        version_table_schema=tables.names.schema,
        include_object=include_object,
        include_schemas=tables.names.schema is not None,
        compare_type=True,
        **kw,
    )


def run_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
               dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as conn:
        _configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
