"""Run the toolkit's shipped Alembic migrations from Python (the ``outbox db`` commands use this).

The scripts live in the repository's top-level ``alembic/`` folder and are packaged into the wheel
as ``outbox/_migrations``. They keep their own version table, ``outbox_alembic_version`` (renamed
tables get one of their own, see :func:`version_table_for`), so they never touch the application's
``alembic_version``.

Already running Alembic for your application? Either run ``outbox db upgrade`` as a separate step,
or call :func:`upgrade` from one of your own migrations::

    from alembic import op
    from outbox.migrations import upgrade as outbox_upgrade

    def upgrade():
        outbox_upgrade(op.get_bind(), "0001_initial")  # pin the revision your migration expects
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .errors import ConfigurationError
from .schema import DEFAULT_TABLE_NAMES, OutboxTables, default_tables

__all__ = [
    "VERSION_TABLE",
    "alembic_config",
    "current",
    "downgrade",
    "heads",
    "layout_for_migration",
    "offline_sql",
    "rows_dropped_by_downgrade",
    "script_location",
    "tables_for_migration",
    "upgrade",
    "version_table_for",
]

VERSION_TABLE = "outbox_alembic_version"
#: the retention layouts a migration can create (``partitioned``: PostgreSQL only, see docs/retention.md)
LAYOUTS = ("plain", "partitioned")
_ACTIVE_TABLES: list[OutboxTables] = []
_ACTIVE_LAYOUT: list[str] = []


def version_table_for(tables: OutboxTables | None = None) -> str:
    """The version table of one set of toolkit tables.

    ``outbox_alembic_version`` for the default names (in ``names.schema`` if one is set). Tables
    renamed with a different outbox table name keep a version table of their own, named after it
    (``shop_outbox`` -> ``shop_outbox_alembic_version``), so two sets of toolkit tables in one
    schema never share, and skip, each other's migrations.
    """
    names = (tables or default_tables()).names
    if names.outbox == DEFAULT_TABLE_NAMES.outbox:
        return VERSION_TABLE
    name = f"{names.outbox}_alembic_version"
    if len(name) > 63:  # PostgreSQL's identifier limit; keep it unique with a digest of the full name
        digest = hashlib.sha256(names.outbox.encode()).hexdigest()[:8]
        name = f"{names.outbox[:42]}_{digest}_alembic_ver"
    return name


def script_location() -> str:
    """Where the migration scripts are: in the installed package, or the source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "alembic"):
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return str(candidate)
    raise ConfigurationError(f"outboxkit's migration scripts are missing (looked in {here / '_migrations'})")


def tables_for_migration() -> OutboxTables:
    """The tables the running migration applies to (used by ``env.py`` and the scripts)."""
    if _ACTIVE_TABLES:
        return _ACTIVE_TABLES[-1]
    try:
        from alembic import context

        tables = context.config.attributes.get("outbox_tables")
        if tables is not None:
            return tables  # type: ignore[no-any-return]
    except Exception:
        pass
    return default_tables()


def layout_for_migration() -> str:
    """The retention layout the running upgrade creates (``plain`` unless asked otherwise)."""
    if _ACTIVE_LAYOUT:
        return _ACTIVE_LAYOUT[-1]
    try:
        from alembic import context

        return str(context.config.attributes.get("outbox_layout") or "plain")
    except Exception:
        return "plain"


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ConfigurationError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def alembic_config(
    *, url: str | None = None, connection: Connection | None = None, tables: OutboxTables | None = None,
    output: io.StringIO | None = None,
) -> Any:
    """An Alembic ``Config`` pointing at the shipped scripts, for ``alembic.command`` functions."""
    from alembic.config import Config

    cfg = Config(output_buffer=output) if output is not None else Config()
    cfg.set_main_option("script_location", script_location())
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    cfg.attributes["outbox_tables"] = tables or default_tables()
    cfg.attributes["version_table"] = version_table_for(tables)
    return cfg


@contextlib.contextmanager
def _connected(bind: Engine | Connection | str) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
        return
    engine = sa.create_engine(bind, poolclass=sa.pool.NullPool) if isinstance(bind, str) else bind
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        if isinstance(bind, str):
            engine.dispose()


@contextlib.contextmanager
def _active(tables: OutboxTables | None) -> Iterator[None]:
    """Tell ``env.py`` and the scripts which tables to migrate, and keep an enclosing Alembic run working.

    ``alembic.context`` and ``alembic.op`` are module-level proxies: entering a run installs them and
    leaving it *deletes* them. When :func:`upgrade` is called from inside the application's own
    migration (``outbox_upgrade(op.get_bind(), ...)``), our run would leave the application's run
    without its ``op`` and ``context``. So the proxies that were installed before are put back after.
    """
    from alembic import context as alembic_context
    from alembic import op as alembic_op

    outer = [getattr(m, "_proxy", None) for m in (alembic_context, alembic_op)]
    _ACTIVE_TABLES.append(tables or default_tables())
    try:
        yield
    finally:
        _ACTIVE_TABLES.pop()
        for proxy in outer:
            if proxy is not None:
                proxy._install_proxy()


def upgrade(bind: Engine | Connection | str, revision: str = "head", *, tables: OutboxTables | None = None,
            layout: str = "plain") -> None:
    """Create or upgrade the toolkit's tables to ``revision``.

    ``layout="partitioned"`` (PostgreSQL) makes revision 0005 create the partitioned retention
    layout (docs/retention.md); it only matters when that revision is applied.
    """
    from alembic import command

    _check_layout(layout)
    with _connected(bind) as conn, _active(tables):
        if layout == "partitioned" and conn.dialect.name != "postgresql":
            raise ConfigurationError(f"the partitioned layout needs PostgreSQL, not {conn.dialect.name}: "
                                     "MySQL, MariaDB and SQLite purge by batched DELETE (leave --layout out)")
        _ACTIVE_LAYOUT.append(layout)
        try:
            command.upgrade(alembic_config(connection=conn, tables=tables), revision)
        finally:
            _ACTIVE_LAYOUT.pop()


def downgrade(bind: Engine | Connection | str, revision: str, *, tables: OutboxTables | None = None) -> None:
    """Downgrade to ``revision`` (``base`` drops every toolkit table)."""
    from alembic import command

    with _connected(bind) as conn, _active(tables):
        for script in _undone(conn, revision, tables) or []:
            check = getattr(script.module, "check_downgrade", None)
            if check is not None:  # refuse before anything changes: MySQL commits each DDL statement at once
                check(conn, (tables or default_tables()).names)
        command.downgrade(alembic_config(connection=conn, tables=tables), revision)


def _undone(conn: Connection, revision: str, tables: OutboxTables | None) -> list[Any] | None:
    """The migration scripts a downgrade to ``revision`` undoes, newest first (None: relative or unknown target,
    left to Alembic)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(script_location())
    now = current(conn, tables=tables)
    if now is None:
        return None
    try:
        lower = "base" if revision == "base" else script.get_revision(revision).revision  # type: ignore[union-attr]
        undone = list(script.iterate_revisions(now, lower))
    except Exception:  # a relative or unknown revision: Alembic's own handling and error
        return None
    return [r for r in undone if r.revision != lower]


def _reaches_base(current_rev: str | None, revision: str) -> bool:
    """Whether downgrading from ``current_rev`` to ``revision`` undoes the first migration."""
    from alembic.script import ScriptDirectory

    if current_rev is None:
        return False
    if revision == "base":
        return True
    steps_text = revision[1:] if revision.startswith("-") else revision.partition("-")[2]
    if revision.startswith(("-", "current-", "head-")) and steps_text.isdigit():
        below = list(ScriptDirectory(script_location()).iterate_revisions(current_rev, "base"))
        return int(steps_text) >= len(below)
    return False


def rows_dropped_by_downgrade(
    bind: Engine | Connection | str, revision: str, *, tables: OutboxTables | None = None
) -> dict[str, int]:
    """Rows in each toolkit table that downgrading to ``revision`` would drop, tables without rows left out.

    Only a downgrade that undoes the first migration (``base``, or ``-N`` reaching it) drops tables.
    ``outbox db downgrade`` refuses to go on without ``--yes`` when this is not empty.
    """
    t = tables or default_tables()
    with _connected(bind) as conn:
        if not _reaches_base(current(conn, tables=t), revision):
            return {}
        inspector = sa.inspect(conn)
        out: dict[str, int] = {}
        for table in t.all():
            if inspector.has_table(table.name, schema=table.schema):
                n = int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
                if n:
                    out[table.name] = n
        if conn.dialect.name == "postgresql":  # the partitioned layout's archive of published rows
            from .dialects.pg_partitions import PartitionNames

            archive = PartitionNames.of(t.names).archive
            if inspector.has_table(archive, schema=t.names.schema):
                n = int(conn.execute(sa.select(sa.func.count()).select_from(
                    sa.table(archive, schema=t.names.schema))).scalar_one())
                if n:
                    out[archive] = n
        return out


def current(bind: Engine | Connection | str, *, tables: OutboxTables | None = None) -> str | None:
    """The revision the database is at, or ``None`` if the toolkit's tables were never created."""
    from alembic.runtime.migration import MigrationContext

    schema = (tables or default_tables()).names.schema
    with _connected(bind) as conn:
        ctx = MigrationContext.configure(
            conn, opts={"version_table": version_table_for(tables), "version_table_schema": schema}
        )
        return ctx.get_current_revision()


def heads() -> list[str]:
    """The newest revision(s) the installed toolkit ships."""
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory(script_location()).get_heads())


def offline_sql(url: str, revision: str = "head", *, from_revision: str | None = None,
                tables: OutboxTables | None = None) -> str:
    """The DDL to reach ``revision``, as SQL text for a DBA (nothing is executed)."""
    from alembic import command

    out = io.StringIO()
    cfg = alembic_config(url=url, tables=tables, output=out)
    target = f"{from_revision}:{revision}" if from_revision else revision
    with _active(tables):
        command.upgrade(cfg, target, sql=True)
    return out.getvalue()
