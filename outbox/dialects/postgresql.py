"""PostgreSQL: BYTEA, JSONB, native UUID, timestamptz, SKIP LOCKED and LISTEN/NOTIFY."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, overload

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Insert

from .._redact import mask_secrets
from ..errors import ConfigurationError
from .base import Blocker, Dialect, PreparedSelect
from .pg_partitions import insert_processed, is_partitioned, maintain

log = logging.getLogger("outbox.relay")
writer_log = logging.getLogger("outbox.writer")


#: SQLSTATE classes / codes a retry can fix: connection exceptions, transaction rollbacks
#: (serialization failure, deadlock), insufficient resources, lock not available, operator
#: intervention (shutdown, statement timeout), system errors, and 25P03: the server ended a
#: session idle in a transaction for longer than ``idle_in_transaction_session_timeout``.
_TRANSIENT_STATES = ("08", "25P03", "40", "53", "55P03", "55006", "57", "58")
#: data exceptions (value too long, numeric out of range, invalid text), integrity constraint
#: violations, and PL/pgSQL raise_exception (a trigger refusing the row).
_PERMANENT_STATES = ("22", "23", "P0")
_ADVISORY_XACT_LOCK = sa.text("SELECT pg_advisory_xact_lock(:key)")
#: the instants a Python datetime holds: from year 1 to the end of year 9999, UTC
_FIRST = sa.literal_column("timestamptz '0001-01-01 00:00:00+00'")
_PAST_LAST = sa.literal_column("timestamptz '10000-01-01 00:00:00+00'")
#: the instants a datetime holds in any session time zone PostgreSQL accepts (offsets up to
#: 167 hours in POSIX notation): those more than a week inside year 1 .. year 9999
_SAFE_FIRST = sa.literal_column("timestamptz '0001-01-08 00:00:00+00'")
_SAFE_PAST_LAST = sa.literal_column("timestamptz '9999-12-24 00:00:00+00'")


class PostgreSQLDialect(Dialect):
    name: ClassVar[str] = "postgresql"
    supports_skip_locked: ClassVar[bool] = True
    supports_concurrent_relays: ClassVar[bool] = True
    supports_pipelined_claims: ClassVar[bool] = True
    supports_notify: ClassVar[bool] = True
    json_as_text: ClassVar[bool] = False  # psycopg parses JSONB itself

    @staticmethod
    def byte_order_string(length: int, dialect: sa.engine.Dialect) -> sa.types.TypeEngine[Any] | None:
        # PostgreSQL < 17 treats only "C" and "POSIX" as the C locale: under C.UTF-8 or en_US.UTF-8
        # every btree comparison copies both strings and calls strcoll. Equality is byte for byte
        # either way (deterministic collations); "C" makes the order byte order too, and the dedup
        # insert (one unique-index insert per message) about 10 % cheaper (docs/benchmarks.md).
        return sa.String(length, collation="C")

    def __init__(self) -> None:
        # the relay's claim statements, compiled once per form (see claim_by_quota)
        self._claims: dict[tuple[Any, ...], _RawSelect] = {}

    def error_kind(self, exc: sa.exc.DBAPIError) -> str | None:
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if not isinstance(state, str):
            return None
        if state.startswith(_TRANSIENT_STATES):
            return "transient"
        if state.startswith(_PERMANENT_STATES):
            return "permanent"
        return None

    @staticmethod
    def type_variants() -> dict[str, sa.types.TypeEngine[Any]]:
        return {
            "payload": pg.BYTEA(),
            "json": pg.JSONB(none_as_null=True),
            "uuid": pg.UUID(as_uuid=True),
            "timestamp": pg.TIMESTAMP(timezone=True),
        }

    def insert_rows(self, connection: Connection, insert: Insert, rows: list[dict[str, Any]]) -> None:
        """``COPY ... FROM STDIN (FORMAT BINARY)`` on psycopg, from ``_COPY_MIN_ROWS`` rows up; fewer rows
        (the writer's ``add()``) as one INSERT on psycopg's own cursor (:class:`_RawInsert`).

        It sends the rows in one stream, encoded by psycopg's C code: 1,000 outbox rows take about a
        fifth of an ``executemany``'s client CPU and half its time. The COPY runs in a savepoint of
        its own. If it fails (a duplicate id, a lost connection, a table whose column types differ
        from the toolkit's), the savepoint is rolled back and the rows go through the ``executemany``
        after all, so that a bad row's error is SQLAlchemy's, explained as any other statement's;
        should that one succeed, COPY is not tried again for this table. Statement event listeners
        (``before_cursor_execute``) do not see the COPY; a connection with a ``schema_translate_map``
        gets the ``executemany``, which applies it. The small INSERT is used only where nothing
        watches the statements (:func:`_unwatched`), so that SQL logs and tracing show every ``add()``.
        """
        plan = None
        if len(rows) < _COPY_MIN_ROWS:
            if _unwatched(connection):
                _raw_insert(insert.table, tuple(rows[0]), connection.dialect).run(connection, rows)
                return
        elif _sync_psycopg(connection):
            plan = _copy_plan(insert.table, tuple(rows[0]), connection.dialect)
        if not plan:
            connection.execute(insert, rows)
            return
        import psycopg

        statement, types, values = plan
        with connection.connection.dbapi_connection.cursor() as cur:  # type: ignore[union-attr]
            cur.execute("SAVEPOINT outbox_copy")
            try:
                with cur.copy(statement) as copy:
                    copy.set_types(types)
                    write = copy.write_row
                    for row in rows:
                        write(values(row))
            except psycopg.Error:
                try:
                    cur.execute("ROLLBACK TO SAVEPOINT outbox_copy")
                    cur.execute("RELEASE SAVEPOINT outbox_copy")
                except psycopg.Error:
                    pass  # the connection is gone: the executemany below says so, in SQLAlchemy's terms
                connection.execute(insert, rows)
                _no_copy(insert.table, tuple(rows[0]))
                writer_log.warning("COPY into %s failed where an INSERT of the same rows did not (do its column "
                                   "types differ from the toolkit's?): add_many uses INSERT for it from now on",
                                   insert.table.name)
                return
            cur.execute("RELEASE SAVEPOINT outbox_copy")

    def insert_ignore(self, table: sa.Table) -> Insert:
        return pg.insert(table).on_conflict_do_nothing()

    @staticmethod
    def readable_timestamp(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        # psycopg fails the whole result on a timestamptz Python cannot hold ('infinity',
        # '-infinity', year 10000 or later, BC), so the claim reads ISO text in UTC instead, and
        # a value out of that range as PostgreSQL writes it, for its row to be refused alone.
        text = sa.func.to_char(sa.func.timezone("UTC", column), 'YYYY-MM-DD"T"HH24:MI:SS.US')
        return sa.case((sa.and_(column >= _FIRST, column < _PAST_LAST), text),
                       else_=sa.cast(column, sa.Text)).label(getattr(column, "name", None))

    def claim_timestamp(self, column: sa.ColumnElement[Any]) -> tuple[sa.ColumnElement[Any], sa.ColumnElement[Any]]:
        # Nearly every row: the timestamptz itself (psycopg decodes its binary form in C). Formatting
        # every row's value as text on the server and parsing it back cost about 17 % of the relay's
        # own per-row instructions. The few a datetime might not hold in the session's time zone
        # come as readable_timestamp's text, in the second column.
        safe = sa.and_(column >= _SAFE_FIRST, column < _SAFE_PAST_LAST)
        return (sa.case((safe, sa.type_coerce(column, sa.types.NullType())), else_=sa.null()),
                sa.case((~safe, self.readable_timestamp(column)), else_=sa.null()))

    def idle_transaction_statements(self, seconds: float, dialect: sa.engine.Dialect) -> list[str]:
        # milliseconds; ends the session (FATAL 25P03), which releases its row locks
        return [f"SET idle_in_transaction_session_timeout = {max(1, math.ceil(seconds * 1000))}"]

    def relay_session_statements(self) -> list[str]:
        """``random_page_cost`` at most 1.1 in the relay's sessions (the common value for SSDs and cached
        data), and their time zone UTC.

        The claim (:meth:`claim_by_quota`) reads each partition's first due rows, whole, through
        the claim index. At the default 4.0 the planner expects those rows' heap pages to cost a
        disk seek each and prefers walking the primary key in id order, filtering out the other
        partitions' rows: 6.7 ms instead of 1.7 ms for 1,000 rows of 32 partitions, and a walk over
        the whole table for a partition with few rows. The relay reads rows written moments ago,
        which are in memory. A lower setting is kept.

        The claim reads each row's ``created_at`` (:meth:`claim_timestamp`), and psycopg gives it the
        session's zone: for ``'UTC'`` Python's fixed ``timezone.utc``, for any other name (Debian's
        default is ``'Etc/UTC'``) a ``ZoneInfo``, whose conversion cost 0.87 instead of 0.26 us a row.
        Nothing the relay does depends on its session's zone (its times are computed in UTC or
        compared as instants); the application's sessions keep theirs.
        """
        return ["SELECT set_config('random_page_cost', "
                "least(current_setting('random_page_cost')::float8, 1.1)::text, false)",
                "SET TIME ZONE 'UTC'"]

    def lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def lock_name(self, connection: Connection, name: bytes) -> None:
        # a transaction-level advisory lock on 64 bits of the name's SHA-256 (a collision only
        # makes two names wait for each other)
        key = int.from_bytes(hashlib.sha256(name).digest()[:8], "big", signed=True)
        connection.execute(_ADVISORY_XACT_LOCK, {"key": key})

    def due_ids(
        self, table: sa.Table, partitions: Sequence[int], per_partition: int, due: Any, blocked: Sequence[Blocker],
        after: Mapping[int, int] | None = None, topics: Sequence[str] | None = None,
    ) -> sa.Subquery:
        """One LATERAL index read per partition, over ``unnest(:partitions)``.

        The statement text does not depend on how many partitions are held nor on how many
        (topic, key) pairs are blocked (arrays, not IN lists), so psycopg can prepare it once and
        the server plans it once (one form without blockers, one with).
        """
        parts = _held(partitions, after or {})
        per = (self._per_partition(table, [table.c.id, table.c.partition], parts, due, blocked, topics)
               .limit(per_partition).lateral("per_partition"))
        return sa.select(per.c.id, per.c.partition).select_from(parts.join(per, sa.true())).subquery("claimable")

    def due_ids_params(self, partitions: Sequence[int], after: Mapping[int, int]) -> dict[str, Any]:
        return {"claim_after": [after.get(p, 0) for p in partitions]}  # the array of _held

    def claim_by_quota(
        self, connection: Connection, table: sa.Table, columns: Sequence[sa.ColumnElement[Any]],
        partitions: Sequence[int], quotas: Sequence[int], due: Any, blocked: Sequence[Blocker],
        after: Mapping[int, int] | None = None, topics: Sequence[str] | None = None,
    ) -> Sequence[Sequence[Any]] | None:
        """The rows :meth:`due_ids` picks, their ``columns`` read and locked in the per-partition read.

        ``FOR UPDATE SKIP LOCKED`` sits inside each partition's ``LATERAL (... LIMIT quota)``: every
        row it locks is returned (no LIMIT above it that could leave locked rows unclaimed, which a
        claim made ahead would then skip, publishing later rows of their partition first), and no
        row is looked up again by id through the primary key.

        The statement is built and compiled once per form (with or without blocked keys), its
        arrays passed as parameters; on psycopg it runs on the driver's cursor with binary results
        (:class:`_RawSelect`): no statement to build and cache-key, no result rows to wrap, and
        no hex to decode for the payloads, about 2 ms of the 4.6 ms a 1,000-row claim took.
        """
        key = (table.fullname, tuple(c.name for c in columns), bool(blocked), tuple(topics or ()), due)
        select = self._claims.get(key)
        if select is None:
            parts = _held([], {}, [])
            per = (self._per_partition(table, columns, parts, due, [Blocker(0, "", "", 0)] if blocked else [],
                                       topics)
                   .limit(parts.c.quota).with_for_update(skip_locked=True, of=table).lateral("per_partition"))
            stmt = sa.select(*per.c).select_from(parts.join(per, sa.true())).order_by(per.c.id)
            select = self._claims[key] = _RawSelect(stmt, connection.dialect)
        after = after or {}
        params: dict[str, Any] = {"claim_partitions": list(partitions),
                                  "claim_after": [after.get(p, 0) for p in partitions],
                                  "claim_quotas": list(quotas)}
        if blocked:
            params.update(_blocked_params(blocked))
        return select.run(connection, params)

    def _per_partition(
        self, table: sa.Table, columns: Sequence[sa.ColumnElement[Any]], parts: Any, due: Any,
        blocked: Sequence[Blocker], topics: Sequence[str] | None,
    ) -> sa.Select[Any]:
        """The due rows of the partition ``parts.c.part`` after ``parts.c.after_id``, in id order."""
        q = sa.select(*columns).where(
            table.c.partition == parts.c.part, table.c.status == "pending", table.c.available_at == due,
            table.c.id > parts.c.after_id)
        # --- relay group's topics (its own clause, independent of the blocked keys below)
        topic_clause = self.topic_filter(table, topics)
        if topic_clause is not None:
            q = q.where(topic_clause)
        # --- blocked keys
        if blocked:
            values = _blocked_params(blocked)
            blk = sa.func.unnest(
                sa.bindparam("claim_block_topics", values["claim_block_topics"], type_=pg.ARRAY(sa.String())),
                sa.bindparam("claim_block_keys", values["claim_block_keys"], type_=pg.ARRAY(sa.String())),
                sa.bindparam("claim_block_ids", values["claim_block_ids"], type_=pg.ARRAY(sa.BigInteger())),
            ).table_valued("topic", "key", "id").render_derived(name="blocker")
            # cheap test first: most rows' keys block nothing, so the correlated NOT EXISTS runs
            # only for rows of a blocked key
            keys = sa.bindparam("claim_blocked_keys", values["claim_blocked_keys"], type_=pg.ARRAY(sa.String()))
            q = q.where(sa.or_(table.c.key != sa.all_(keys), ~sa.exists().where(
                blk.c.topic == table.c.topic, blk.c.key == table.c.key, table.c.id > blk.c.id)))
        return q.order_by(table.c.id)

    def delete_ids(self, connection: Connection, table: sa.Table, ids: Sequence[int]) -> None:
        """One ``DELETE ... WHERE id = ANY(...)``; on psycopg, where nothing watches the statements
        (:func:`_unwatched`), compiled once per table and run on the driver's cursor (:class:`_RawByIds`):
        the relay's mark runs it in every round, and through ``Connection.execute`` building the
        statement and its cache key cost several times the statement's own client time for a few ids."""
        if _unwatched(connection):
            _by_ids(table, (), connection.dialect).run(connection, ids, {})
            return
        connection.execute(table.delete().where(table.c.id == sa.any_(_id_array(ids))))

    def prepared_select(self, select: sa.Select[Any]) -> PreparedSelect:
        """On psycopg, where nothing watches the statements, compiled at its first run and run on the
        driver's cursor (:class:`_RawSelect`, as the claim is): the lease lock of every round then costs
        its round trip, not the IN list expanded again, a cache key and the result wrapped (about
        0.5 ms of an idle round's 3 ms), and the look-ups of delayed rows and blocked keys every few
        rounds 0.25 ms each instead of 1.3 (docs/benchmarks.md, tenth session)."""
        return _PreparedSelect(select)

    def update_ids(self, connection: Connection, table: sa.Table, ids: Sequence[int], values: dict[str, Any]) -> None:
        """One ``UPDATE ... WHERE id = ANY(...)``; on psycopg, where nothing watches, compiled once per
        table and set of columns and run on the driver's cursor, as :meth:`delete_ids` (audit mode
        marks every round's rows published with it)."""
        if _unwatched(connection):
            _by_ids(table, tuple(values), connection.dialect).run(connection, ids, values)
            return
        connection.execute(table.update().where(table.c.id == sa.any_(_id_array(ids))).values(**values))

    def lock_claim(self, select: sa.Select[Any], table: sa.Table) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True, of=table)

    def notify(self, connection: Connection, channel: str) -> None:
        # NOTIFY, a utility statement: no result set for the driver and SQLAlchemy to build, about
        # half the client time of SELECT pg_notify(...) per writer transaction (bench_writer's add_notify).
        # The channel is a validated table name (schema.TableNames), quoted as LISTEN quotes it.
        quoted = connection.dialect.identifier_preparer.quote_identifier(channel)
        connection.exec_driver_sql(f"NOTIFY {quoted}")

    def start_listener(
        self, engine: Engine, channel: str, on_wake: Callable[[], None], stop: threading.Event
    ) -> threading.Thread | None:
        if engine.dialect.driver != "psycopg":
            raise ConfigurationError(
                f"NOTIFY wake-ups need the psycopg (3) driver, not {engine.dialect.driver!r}: "
                "use a postgresql+psycopg:// URL or turn notify off"
            )
        thread = threading.Thread(
            target=_listen, args=(engine, channel, on_wake, stop), name="outbox-listen", daemon=True
        )
        thread.start()
        return thread

    def maintain_partitions(self, engine: Engine, tables: Any) -> None:
        maintain(engine, tables)

    def insert_new_keys(
        self, connection: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], key_column: str
    ) -> set[Any]:
        """One ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING`` with the keys as one parameter (a JSON array).

        Duplicates are found by the conflict pre-check, so they add no heap tuple (no dead tuples).
        On the partitioned layout (a partitioned processed table) see :func:`.pg_partitions.insert_processed`.
        """
        if not rows:
            return set()
        if is_partitioned(connection, (table.schema, table.name)):
            return insert_processed(connection, table, rows, key_column)
        if len(rows) == 1 or not _shared_values(rows, key_column):
            return super().insert_new_keys(connection, table, rows, key_column)
        first = rows[0]
        stmt, params = _insert_unnest(table, key_column, [r[key_column] for r in rows],
                                      {c: v for c, v in first.items() if c != key_column})
        return set(connection.execute(stmt.returning(table.c[key_column]), params).scalars())

    def insert_new_keys_reading(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        keys: Sequence[Any],
        values: Mapping[str, Any],
        read_column: str,
    ) -> tuple[set[Any], dict[Any, Any]]:
        """One statement: the insert of :meth:`insert_new_keys` as a data-modifying CTE, and
        ``read_column`` of the rows that were there already, in one round trip.

        The outer SELECT sees the statement's snapshot, so it reads exactly the rows that were there
        before (never those the CTE inserts). A key neither inserted nor read was committed by a
        concurrent transaction meanwhile (the conflict check waited for it): it is read again.
        The statement is built once per table and column set (see :func:`_reading_statement`).
        """
        if len(keys) < 2 or is_partitioned(connection, (table.schema, table.name)):
            return super().insert_new_keys_reading(connection, table, key_column, keys, values, read_column)
        stmt = _reading_statement(table, key_column, tuple(values), read_column)
        new: set[Any] = set()
        existing: dict[Any, Any] = {}
        for k, inserted, value in connection.execute(stmt, _insert_params(keys, values)).all():
            if inserted:
                new.add(k)
            else:
                existing[k] = value
        if len(new) + len(existing) < len(keys):
            existing.update(self.read_existing(
                connection, table, key_column, [k for k in keys if k not in new and k not in existing], values,
                read_column))
        return new, existing

    def inserts_keys_at_end(self, connection: Connection, table: sa.Table) -> bool:
        # the partitioned layout's insert must also look in the other buckets (pg_partitions)
        return not is_partitioned(connection, (table.schema, table.name))

    def insert_keys(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        values: Mapping[str, Any],
        column: str,
        by_key: Mapping[Any, Any],
    ) -> None:
        """One plain ``INSERT ... SELECT`` from one JSON parameter: the keys alone when every value
        is ``None`` (``json_array_elements_text``, as :meth:`insert_new_keys`), else
        ``[{"k": key, "v": value}, ...]`` through the column type's bind processing (as
        :meth:`update_by_keys`; a ``None`` value becomes SQL NULL). No ``ON CONFLICT``: a key
        already there raises (the caller read the keys first).

        The rows go in key order (the keys' byte order, which ``COLLATE "C"`` sorts by): the index
        descents then walk the primary key's pages in order (12 % less server CPU for 450 random
        ids), and two transactions inserting overlapping ids wait for each other instead of
        deadlocking."""
        plan = _keys_insert(table, key_column, values, column, by_key)
        if plan is None:
            return super().insert_keys(connection, table, key_column, values, column, by_key)
        connection.execute(*plan)

    def start_insert_keys(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        values: Mapping[str, Any],
        column: str,
        by_key: Mapping[Any, Any],
    ) -> Callable[[], None] | None:
        """:meth:`insert_keys`'s statement sent on psycopg's own connection, not waited for
        (:class:`_Started`: an asyncio task, or a worker thread for the sync driver), where nothing
        watches the statements (:func:`_unwatched_by`, as for the writer's direct INSERT): the dedup
        consumer then flushes the handlers' rows meanwhile, and psycopg's connection lock makes that
        flush's first statement wait for this one."""
        if not (_own_psycopg(connection) and _unwatched_by(connection)):
            return None
        plan = _keys_insert(table, key_column, values, column, by_key)
        if plan is None:
            return None
        stmt, params = plan
        started = _once(table, ("started", stmt, connection.dialect), lambda: _Started(stmt, connection.dialect))
        if connection.dialect.is_async:
            return started.start(connection, params)  # type: ignore[no-any-return]
        return started.start_in_thread(connection, params)  # type: ignore[no-any-return]

    def read_existing(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        keys: Sequence[Any],
        values: Mapping[str, Any],
        read_column: str,
    ) -> dict[Any, Any]:
        """One index look-up per key, the keys sent as one JSON text parameter (see :func:`_keys_param`),
        in key order: the descents then walk the primary key's pages in order (450 new random ids and
        50 stored ones among 300,000: 3.37 ms against 3.81 ms unsorted, median of 35)."""
        if len(keys) < 2 or not all(isinstance(k, str) for k in keys):
            return super().read_existing(connection, table, key_column, keys, values, read_column)
        # the other primary-key columns pick the rows (values may hold more, e.g. processed_at)
        where = {c.name: values[c.name] for c in table.primary_key.columns if c.name != key_column}
        stmt = _once(table, ("read", key_column, tuple(where), read_column),
                     lambda: _read_statement(table, key_column, tuple(where), read_column))
        return dict(connection.execute(stmt, _insert_params(sorted(keys), where)).all())

    def read_existing_in_parts(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        parts: Sequence[Sequence[Any]],
        values: Mapping[str, Any],
        read_column: str,
    ) -> Iterator[dict[Any, Any]]:
        """:meth:`read_existing` part by part, each later part's read sent on psycopg's own connection
        (:class:`_Started`, as :meth:`start_insert_keys`) before the previous part's rows are handed
        over: the asyncio dedup consumer runs a part's handlers while the server looks up the next
        part's keys (a 500-message batch in 3 parts: 0.85-0.87 -> 0.89-0.90 of the plain loop,
        in-process A/B). The first part is read as :meth:`read_existing` reads. On the sync driver,
        where something watches the statements, or where a key is not a str, the default (one
        read): a worker thread per part gained nothing measurable (its start and the GIL it needs
        to take the answer eat the overlap)."""
        if (len(parts) < 2 or not connection.dialect.is_async
                or not (_own_psycopg(connection) and _unwatched_by(connection))
                or not all(isinstance(k, str) for p in parts for k in p)):
            yield from super().read_existing_in_parts(connection, table, key_column, parts, values, read_column)
            return
        where = {c.name: values[c.name] for c in table.primary_key.columns if c.name != key_column}
        stmt = _once(table, ("read", key_column, tuple(where), read_column),
                     lambda: _read_statement(table, key_column, tuple(where), read_column))
        started = _once(table, ("started-read", stmt, connection.dialect),
                        lambda: _Started(stmt, connection.dialect, rows=True))
        current = self.read_existing(connection, table, key_column, parts[0], values, read_column)
        for nxt in [*parts[1:], None]:
            pending = started.start(connection, _insert_params(sorted(nxt), where)) if nxt else None
            try:
                yield current
            except GeneratorExit:  # the caller stopped (a handler failed): the read still under way is let finish
                if pending is not None:
                    with contextlib.suppress(Exception):
                        pending()
                raise
            current = dict(pending()) if pending is not None else {}

    def update_by_keys(
        self,
        connection: Connection,
        table: sa.Table,
        key_column: str,
        values: Mapping[str, Any],
        column: str,
        by_key: Mapping[Any, Any],
    ) -> None:
        """One ``UPDATE ... FROM jsonb_array_elements(:rows)`` for all the keys, not one UPDATE a key.

        The pairs travel as one JSONB document ``[{"k": key, "v": value}, ...]`` serialised by the
        column type's own bind processing (the engine's ``json_serializer``), so each value is stored
        as an UPDATE of its own would store it. Only for a JSON ``column``; anything else goes the
        generic way.
        """
        if len(by_key) < 2 or not isinstance(table.c[column].type, sa.JSON):
            return super().update_by_keys(connection, table, key_column, values, column, by_key)
        connection.execute(_update_statement(table, key_column, tuple(values), column),
                           {"_rows": [{"k": k, "v": v} for k, v in by_key.items()],
                            **{f"_w_{c}": v for c, v in values.items()}})

    def rows_by_keys(
        self, connection: Connection, table: sa.Table, columns: Sequence[sa.ColumnElement[Any]],
        where: Sequence[sa.ColumnElement[bool]], key_column: str, keys: Sequence[Any],
    ) -> list[sa.Row[Any]]:
        """One index look-up per key: ``unnest(:keys)`` and a ``LATERAL (... LIMIT 1)`` per key.

        ``WHERE ... AND key IN (...)`` depends on the table's statistics: for a consumer whose rows
        arrived since the last ANALYZE the planner expects one row, scans all of that consumer's
        rows with the key list as a filter (70 ms a batch at 45,000 rows, growing), and a join on
        ``unnest`` does the same. The LIMIT keeps the sub-select from being pulled up into a join.
        """
        if not keys:
            return []
        key = table.c[key_column]
        # VARCHAR[] without the column's collation: an array cast renders it (COLLATE "C" since
        # 0006), and an explicit collation on the keys would make the primary key unusable for the
        # look-up on a database not yet migrated (a sequential scan per key)
        u = (sa.func.unnest(sa.bindparam("_keys", list(keys), type_=pg.ARRAY(sa.String())))
             .table_valued("v").render_derived(name="u"))
        per_key = sa.select(*columns).where(*where, key == u.c.v).limit(1).lateral("p")
        return list(connection.execute(sa.select(*per_key.c).select_from(u).join(per_key, sa.true())).all())


def _shared_values(rows: Sequence[Mapping[str, Any]], key_column: str) -> bool:
    """Whether every row has the first row's values in the columns other than ``key_column``."""
    first = rows[0]
    others = [c for c in first if c != key_column]
    return all(r[c] == first[c] for r in rows for c in others)


def _keys_param() -> Any:
    """The keys of :func:`_insert_unnest`, one row each: ``json_array_elements_text(:_keys)``.

    The keys travel as one JSON array in one text parameter (see :func:`_insert_params`), not as a
    ``VARCHAR[]`` array: psycopg dumps a list of str in its text array format element by element in
    Python (about 0.6 ms for 500 ids, more than a tenth of the whole dedup statement), where
    ``json.dumps`` takes 0.05 ms and the server parses either as fast.
    """
    return sa.func.json_array_elements_text(sa.cast(sa.bindparam("_keys", type_=sa.Text()), pg.JSON()))


def _insert_params(keys: Sequence[Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of :func:`_insert_unnest` and :func:`_reading_statement`."""
    # ensure_ascii=False: non-ASCII ids travel as text in the connection's encoding (a \\uXXXX escape
    # above U+007F is refused unless the server encoding is UTF8); stored ids hold no NUL (storable_id)
    params: dict[str, Any] = {"_keys": json.dumps(list(keys), ensure_ascii=False)}
    params.update({f"_v_{c}": v for c, v in values.items()})
    return params


def _insert_unnest(
    table: sa.Table, key_column: str, keys: Sequence[Any], values: Mapping[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """``INSERT ... SELECT <each key>, :_v_<col>... ON CONFLICT DO NOTHING`` and its parameters."""
    return _insert_statement(table, key_column, tuple(values)), _insert_params(keys, values)


def _insert_statement(table: sa.Table, key_column: str, columns: tuple[str, ...], *, ignore: bool = True) -> Any:
    select = sa.select(_keys_param(), *(sa.bindparam(f"_v_{c}", type_=table.c[c].type) for c in columns))
    stmt = pg.insert(table).from_select([key_column, *columns], select)
    return stmt.on_conflict_do_nothing() if ignore else stmt


def _keys_insert(
    table: sa.Table, key_column: str, values: Mapping[str, Any], column: str, by_key: Mapping[Any, Any]
) -> tuple[Any, dict[str, Any]] | None:
    """The statement and parameters of :meth:`PostgreSQLDialect.insert_keys`, or ``None`` where the
    generic form applies (one key, a column that is not JSON, keys that are not all str)."""
    if len(by_key) < 2 or not isinstance(table.c[column].type, sa.JSON) or not all(isinstance(k, str) for k in by_key):
        return None
    columns = tuple(values)
    keys = sorted(by_key)
    if all(v is None for v in by_key.values()):
        return (_once(table, ("insert", key_column, columns),
                      lambda: _insert_statement(table, key_column, columns, ignore=False)),
                _insert_params(keys, values))
    return (_insert_rows_statement(table, key_column, columns, column),
            {"_rows": [{"k": k, "v": by_key[k]} for k in keys], **{f"_v_{c}": v for c, v in values.items()}})


def _insert_rows_statement(table: sa.Table, key_column: str, columns: tuple[str, ...], column: str) -> Any:
    """The statement of :meth:`PostgreSQLDialect.insert_keys` with values (built once, see :func:`_once`)."""

    def build() -> Any:
        rows = (sa.func.jsonb_array_elements(sa.bindparam("_rows", type_=pg.JSONB(none_as_null=True)))
                .table_valued(sa.column("value", pg.JSONB())).render_derived(name="r"))
        # a None value is JSON null in the document: stored as SQL NULL, as an insert of None would
        value = sa.func.nullif(rows.c.value["v"], sa.literal_column("'null'::jsonb"))
        select = sa.select(rows.c.value["k"].astext,
                           *(sa.bindparam(f"_v_{c}", type_=table.c[c].type) for c in columns), value)
        return pg.insert(table).from_select([key_column, *columns, column], select)

    return _once(table, ("insert-rows", key_column, columns, column), build)


def _read_statement(table: sa.Table, key_column: str, columns: tuple[str, ...], read_column: str) -> Any:
    """``key_column, read_column`` of the rows of the given keys: one ``LATERAL (... LIMIT 1)``
    index look-up per key (see :meth:`PostgreSQLDialect.rows_by_keys`), the keys as JSON text."""
    key, read = table.c[key_column], table.c[read_column]
    given = _keys_param().table_valued("k").render_derived(name="given")
    per_key = (sa.select(key, read)
               .where(*(table.c[c] == sa.bindparam(f"_v_{c}", type_=table.c[c].type) for c in columns),
                      key == given.c.k)
               .limit(1).lateral("p"))
    return sa.select(per_key.c[key_column], per_key.c[read_column]).select_from(given).join(per_key, sa.true())


#: the dedup statements, built once per table and form (every value is a bind parameter): building
#: one for every batch cost 0.3 ms
_STATEMENTS: weakref.WeakKeyDictionary[sa.Table, dict[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


#: below this many rows an ``executemany`` is as quick as a COPY and its savepoint (measured: equal at 1-5 rows)
_COPY_MIN_ROWS = 10
#: PostgreSQL type names for binary COPY, by the SQLAlchemy type's name as PostgreSQL compiles it
_COPY_TYPES = {"UUID": "uuid", "VARCHAR": "varchar", "TEXT": "text", "BYTEA": "bytea", "JSONB": "jsonb",
               "JSON": "json", "SMALLINT": "int2", "INTEGER": "int4", "BIGINT": "int8",
               "TIMESTAMP WITH TIME ZONE": "timestamptz"}


def _copy_plan(table: sa.Table, columns: tuple[str, ...], dialect: sa.engine.Dialect) -> Any:
    """The COPY statement, its columns' binary types and a row-to-tuple getter; None where not to COPY."""
    return _once(table, ("copy", columns), lambda: _build_copy(table, columns, dialect))


def _no_copy(table: sa.Table, columns: tuple[str, ...]) -> None:
    _STATEMENTS.setdefault(table, {})[("copy", columns)] = False


def _build_copy(table: sa.Table, columns: tuple[str, ...], dialect: sa.engine.Dialect) -> Any:
    import operator

    types = []
    for name in columns:
        compiled = table.c[name].type.compile(dialect=dialect).split("(")[0].split(" COLLATE")[0].strip()
        pg_type = _COPY_TYPES.get(compiled.upper())
        if pg_type is None:
            return False
        types.append(pg_type)
    prep = dialect.identifier_preparer
    cols = ", ".join(prep.format_column(table.c[name]) for name in columns)
    statement = f"COPY {prep.format_table(table)} ({cols}) FROM STDIN (FORMAT BINARY)"
    getter = operator.itemgetter(*columns)
    values = getter if len(columns) > 1 else (lambda row: (getter(row),))
    return statement, types, values


def _once(table: sa.Table, form: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """The statement ``build()`` makes for ``table`` in this ``form``, built the first time only."""
    per_table = _STATEMENTS.setdefault(table, {})
    stmt = per_table.get(form)
    if stmt is None:
        stmt = per_table[form] = build()
    return stmt


def _reading_statement(table: sa.Table, key_column: str, columns: tuple[str, ...], read_column: str) -> Any:
    """The statement of :meth:`PostgreSQLDialect.insert_new_keys_reading` (built once, see :func:`_once`)."""
    return _once(table, ("reading", key_column, columns, read_column),
                 lambda: _build_reading(table, key_column, columns, read_column))


def _build_reading(table: sa.Table, key_column: str, columns: tuple[str, ...], read_column: str) -> Any:
    key, read = table.c[key_column], table.c[read_column]
    ins = _insert_statement(table, key_column, columns).returning(key).cte("inserted")
    # the keys joined row by row (index lookups), not `key = ANY(:keys)`, which without statistics
    # PostgreSQL runs as a scan of all the consumer's rows, each tested against every key
    # (only the keys the CTE did not insert: the duplicates)
    given = _keys_param().table_valued("k").render_derived(name="given")
    rest = sa.except_(sa.select(given.c.k), sa.select(ins.c[key_column])).subquery("rest")
    others = [c for c in table.primary_key.columns if c.name != key_column]
    # one index look-up per duplicate (LIMIT 1 keeps the sub-select from becoming a join that,
    # without fresh statistics, scans every row of the consumer): see rows_by_keys
    per_key = (sa.select(key, read).where(*(c == sa.bindparam(f"_v_{c.name}", type_=c.type) for c in others),
                                          key == rest.c.k)
               .limit(1).lateral("p"))
    return sa.union_all(
        sa.select(ins.c[key_column], sa.true(), sa.cast(sa.null(), read.type)),
        sa.select(per_key.c[key_column], sa.false(), per_key.c[read_column])
        .select_from(rest).join(per_key, sa.true()),
    )


def _update_statement(table: sa.Table, key_column: str, columns: tuple[str, ...], column: str) -> Any:
    """The statement of :meth:`PostgreSQLDialect.update_by_keys` (built once, see :func:`_once`)."""

    def build() -> Any:
        rows = (sa.func.jsonb_array_elements(sa.bindparam("_rows", type_=pg.JSONB(none_as_null=True)))
                .table_valued(sa.column("value", pg.JSONB())).render_derived(name="r"))
        return (table.update()
                .where(*(table.c[c] == sa.bindparam(f"_w_{c}", type_=table.c[c].type) for c in columns),
                       table.c[key_column] == rows.c.value["k"].astext)
                .values({column: rows.c.value["v"]}))

    return _once(table, ("update", key_column, columns, column), build)


def _blocked_params(blocked: Sequence[Blocker]) -> dict[str, list[Any]]:
    """The blocked keys of a claim as its array parameters."""
    return {"claim_block_topics": [b.topic for b in blocked], "claim_block_keys": [b.key for b in blocked],
            "claim_block_ids": [b.id for b in blocked], "claim_blocked_keys": sorted({b.key for b in blocked})}


def _own_psycopg(connection: Connection) -> bool:
    """Whether psycopg's own cursor (sync or asyncio driver) may run a statement for ``connection``:
    psycopg, and no ``schema_translate_map`` (which only ``Connection.execute`` applies)."""
    return (connection.dialect.driver == "psycopg"
            and not connection.get_execution_options().get("schema_translate_map"))


def _sync_psycopg(connection: Connection) -> bool:
    """:func:`_own_psycopg` on the sync driver."""
    return not connection.dialect.is_async and _own_psycopg(connection)


def _unwatched_by(connection: Connection) -> bool:
    """Nothing that would miss a statement run past ``Connection.execute``: no ``before_cursor_execute``
    / ``after_cursor_execute`` listener (such as OpenTelemetry's SQLAlchemy instrumentation), no
    ``echo`` or ``sqlalchemy.engine`` INFO logging."""
    dispatch = connection.dispatch
    return (not getattr(connection, "_echo", True)
            and not dispatch.before_cursor_execute and not dispatch.after_cursor_execute)


def _unwatched(connection: Connection) -> bool:
    """:func:`_sync_psycopg`, and nothing watching the statements (:func:`_unwatched_by`)."""
    return _sync_psycopg(connection) and _unwatched_by(connection)


def _bind_processors(compiled: Any, dialect: sa.engine.Dialect) -> dict[str, Callable[[Any], Any]]:
    """The bind processing SQLAlchemy would apply to each parameter of ``compiled``, by parameter name."""
    out: dict[str, Callable[[Any], Any]] = {}
    for bind, name in compiled.bind_names.items():
        proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if proc is not None:
            out[name] = proc
    return out


@overload
def _run_on_cursor(connection: Connection, sql: str, params: dict[str, Any] | list[dict[str, Any]],
                   *, rows: Literal[False] = False) -> None: ...
@overload
def _run_on_cursor(connection: Connection, sql: str, params: dict[str, Any],
                   *, rows: Literal[True]) -> list[Any]: ...
def _run_on_cursor(connection: Connection, sql: str, params: dict[str, Any] | list[dict[str, Any]],
                   *, rows: bool = False) -> list[Any] | None:
    """``sql`` on psycopg's own cursor of ``connection``: one set of ``params`` executed, a list of them
    ``executemany``; with ``rows``, the statement's rows, as plain tuples in binary format. A driver error
    goes through SQLAlchemy's own handling (``handle_error`` listeners, invalidation of a lost
    connection and of the pool it came from) and is raised as the ``DBAPIError`` ``Connection.execute``
    raises."""
    cursor = connection.connection.driver_connection.cursor(binary=rows)  # type: ignore[union-attr]
    try:
        if isinstance(params, list):
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return cursor.fetchall() if rows else None
    except connection.dialect.loaded_dbapi.Error as exc:
        connection._handle_dbapi_exception(exc, sql, params, cursor, None)
    finally:
        cursor.close()


def _raw_insert(table: sa.Table, columns: tuple[str, ...], dialect: sa.engine.Dialect) -> _RawInsert:
    return _once(table, ("raw-insert", columns), lambda: _RawInsert(table, columns, dialect))  # type: ignore[no-any-return]


class _RawInsert:
    """``INSERT INTO table (columns) VALUES (...)`` compiled once by SQLAlchemy, run on psycopg's own cursor.

    The writer's ``add()`` sends one row a flush: through ``Connection.execute`` the statement's
    set-up (cache look-up, parameter construction, result wrapping) cost about as much client CPU
    as the rest of the outbox row (the ORM's INSERT of it twice that). The SQL text and the bind
    processing are SQLAlchemy's, as for :class:`_RawSelect`. A driver error goes through
    SQLAlchemy's own handling (``handle_error`` listeners, so the toolkit's explanations of a
    forgotten ``db upgrade`` or a duplicate id; invalidation of a lost connection), and is raised
    as the ``DBAPIError`` ``Connection.execute`` would raise.
    """

    def __init__(self, table: sa.Table, columns: tuple[str, ...], dialect: sa.engine.Dialect) -> None:
        # inline: no RETURNING id (the writer never reads it), so no result set for psycopg to build
        compiled = sa.insert(table).inline().compile(dialect=dialect, column_keys=list(columns))
        self.sql = compiled.string
        self.processors = _bind_processors(compiled, dialect)
        self.names = {bind.key: name for bind, name in compiled.bind_names.items()}

    def run(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        params = []
        names, processors = self.names, self.processors
        for row in rows:
            values = {names[k]: v for k, v in row.items()}
            for name, proc in processors.items():
                values[name] = proc(values[name])
            params.append(values)
        _run_on_cursor(connection, self.sql, params[0] if len(params) == 1 else params)


class _Started:
    """A statement compiled once by SQLAlchemy, sent on psycopg's own connection without waiting for it.

    The statement goes out and the caller goes on with its own work on the same connection, whose
    next statement waits for this one behind psycopg's connection lock. On the asyncio driver
    (:meth:`start`) it runs as a task on the event loop, which is let run up to the point where it
    waits for the server's answer; on the sync driver (:meth:`start_in_thread`) in a worker thread,
    which holds the GIL until it waits on the socket, i.e. until the statement has been sent. The
    callable that either returns waits for the statement; a driver error is raised as
    ``Connection.execute`` would raise it (SQLAlchemy's ``DBAPIError`` subclasses, through its
    ``handle_error`` and invalidation). The asyncio form is called from SQLAlchemy's greenlet (an
    ``AsyncSession``'s synchronous code), like every asyncio driver call.
    """

    def __init__(self, stmt: Any, dialect: sa.engine.Dialect, *, rows: bool = False) -> None:
        self.compiled = stmt.compile(dialect=dialect)
        self.sql = self.compiled.string
        self.processors = _bind_processors(self.compiled, dialect)
        #: whether the statement returns rows; then the callable :meth:`start` returns gives them (plain
        #: tuples, through each column type's result processing, as Connection.execute would hand them
        #: over). Only :meth:`start`: nothing reads rows from a worker thread
        self.rows = rows
        self.results = [c[3].dialect_impl(dialect).result_processor(dialect, None)
                        for c in self.compiled._result_columns] if rows else []

    def _values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = self.compiled.construct_params(dict(params))
        for name, proc in self.processors.items():
            values[name] = proc(values[name])
        return values

    def _finish(self, connection: Connection, wait: Callable[[], Any], values: dict[str, Any]) -> Callable[[], Any]:
        sql, results = self.sql, self.results

        def finish() -> Any:
            try:
                rows = wait()
            except connection.dialect.loaded_dbapi.Error as exc:
                connection._handle_dbapi_exception(exc, sql, values, None, None)
            if rows is None or not any(results):
                return rows
            return [tuple(v if p is None else p(v) for p, v in zip(results, row, strict=True)) for row in rows]

        return finish

    def start(self, connection: Connection, params: Mapping[str, Any]) -> Callable[[], Any]:
        import asyncio

        try:
            from sqlalchemy.util import await_ as wait_for  # SQLAlchemy >= 2.1
        except ImportError:  # pragma: no cover - SQLAlchemy 2.0
            from sqlalchemy.util import await_only as wait_for

        values = self._values(params)
        driver = connection.connection.driver_connection
        sql, rows = self.sql, self.rows

        async def run() -> Any:
            async with driver.cursor() as cursor:  # type: ignore[union-attr]
                await cursor.execute(sql, values)
                return await cursor.fetchall() if rows else None

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(_retrieve)  # an error nobody waited for (the batch given up) is not logged as lost
        wait_for(asyncio.sleep(0))  # one turn of the loop: the task sends the statement and waits for its answer
        return self._finish(connection, lambda: wait_for(task), values)

    def start_in_thread(self, connection: Connection, params: Mapping[str, Any]) -> Callable[[], Any]:
        """The sync driver's form: a thread of its own per statement (about 0.1 ms to start, a tenth of
        a microsecond a message of a 500-message batch; no pool whose threads a fork would lose)."""
        values = self._values(params)
        driver = connection.connection.driver_connection
        sql = self.sql
        sending = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                with driver.cursor() as cursor:  # type: ignore[union-attr]
                    sending.set()  # the thread keeps the GIL from here until it waits for the server's answer
                    cursor.execute(sql, values)
            except BaseException as exc:
                failed.append(exc)
            finally:
                sending.set()  # also when no cursor could be made

        thread = threading.Thread(target=run, name="outboxkit-send", daemon=True)
        thread.start()
        sending.wait()

        def wait() -> None:
            thread.join()
            if failed:
                raise failed[0]

        return self._finish(connection, wait, values)


def _retrieve(task: Any) -> None:
    if not task.cancelled():
        task.exception()


class _RawSelect:
    """A SELECT compiled once by SQLAlchemy, run on psycopg's own cursor with binary results.

    For the statement the relay runs every batch: the SQL text and the bind processing are
    SQLAlchemy's (nothing is written by hand, nothing comes from user strings); only the execution
    skips the per-call statement cache look-up and result wrapping, and asks for binary rows.
    The rows are plain tuples. Driver errors go through SQLAlchemy's own handling and are raised as
    its ``DBAPIError`` subclasses, as on ``Connection.execute`` (:func:`_run_on_cursor`; the relay
    classifies those). Other drivers go through ``Connection.execute``, and so does a connection whose
    statements something watches (:func:`_unwatched`: a cursor listener such as OpenTelemetry's, or
    ``echo``), so that SQL logs and traces show the claim.
    """

    def __init__(self, stmt: sa.Select[Any], dialect: sa.engine.Dialect) -> None:
        self.stmt = stmt
        # expanding parameters (the topic filter's IN list) rendered as the plain ones they hold:
        # their values are part of the claim's form (see claim_by_quota), fixed for the relay
        compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        self.sql = compiled.string
        self.defaults = compiled.construct_params()
        self.processors = _bind_processors(compiled, dialect)

    def run(self, connection: Connection, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        if not _unwatched(connection):  # another driver, or a listener / echo that must see the statement
            return connection.execute(self.stmt, dict(params)).all()
        values = {**self.defaults, **params}
        for name, proc in self.processors.items():
            values[name] = proc(values[name])
        return _run_on_cursor(connection, self.sql, values, rows=True)


class _PreparedSelect:
    """:meth:`PostgreSQLDialect.prepared_select`: a :class:`_RawSelect` made at the first run on psycopg."""

    def __init__(self, stmt: sa.Select[Any]) -> None:
        self.stmt = stmt
        self.raw: _RawSelect | None = None

    def __call__(self, connection: Connection, params: Mapping[str, Any] | None = None) -> Sequence[Sequence[Any]]:
        if self.raw is None:
            self.raw = _RawSelect(self.stmt, connection.dialect)
        return self.raw.run(connection, params or {})


def _by_ids(table: sa.Table, columns: tuple[str, ...], dialect: sa.engine.Dialect) -> _RawByIds:
    """The DELETE (no ``columns``) or the UPDATE of ``columns`` of rows by id, built once (see :func:`_once`)."""
    return _once(table, ("by-ids", columns), lambda: _RawByIds(table, columns, dialect))  # type: ignore[no-any-return]


class _RawByIds:
    """``DELETE FROM table WHERE id = ANY(<ids>)`` (:func:`_id_array`), or ``UPDATE table SET <columns>``
    with the same condition, compiled once by SQLAlchemy and run on psycopg's own cursor. The SQL text
    and the bind processing are SQLAlchemy's (each column's values go through its type, the column
    names are the table's: ``KeyError`` for any other, never SQL from strings). A driver error goes
    through SQLAlchemy's own handling, as for :class:`_RawInsert`, and is raised as the ``DBAPIError``
    ``Connection.execute`` would raise."""

    def __init__(self, table: sa.Table, columns: tuple[str, ...], dialect: sa.engine.Dialect) -> None:
        where = table.c.id == sa.any_(_id_array([]))
        if columns:
            stmt: Any = table.update().where(where).values(
                {table.c[c]: sa.bindparam(f"set_{c}", type_=table.c[c].type) for c in columns})
        else:
            stmt = table.delete().where(where)
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self.names = {bind.key: name for bind, name in compiled.bind_names.items()}
        self.processors = _bind_processors(compiled, dialect)

    def run(self, connection: Connection, ids: Sequence[int], values: Mapping[str, Any]) -> None:
        names = self.names
        params = {names["row_ids"]: _id_text(ids)}
        for column, value in values.items():
            params[names[f"set_{column}"]] = value
        for name, proc in self.processors.items():
            params[name] = proc(params[name])
        _run_on_cursor(connection, self.sql, params)


def _held(partitions: Sequence[int], after: Mapping[int, int], quotas: Sequence[int] | None = None) -> Any:
    """``unnest(:partitions, :after[, :quotas]) AS held(part, after_id[, quota])``: one row per partition."""
    arrays = [
        sa.bindparam("claim_partitions", list(partitions), type_=pg.ARRAY(sa.SmallInteger())),
        sa.bindparam("claim_after", [after.get(p, 0) for p in partitions], type_=pg.ARRAY(sa.BigInteger())),
    ]
    names = ["part", "after_id"]
    if quotas is not None:
        arrays.append(sa.bindparam("claim_quotas", list(quotas), type_=pg.ARRAY(sa.Integer())))
        names.append("quota")
    return sa.func.unnest(*arrays).table_valued(*names).render_derived(name="held")


def _id_array(ids: Sequence[int]) -> Any:
    """``ids`` as one ``BIGINT[]`` parameter: ``CAST(string_to_array(:row_ids, ',') AS BIGINT[])`` of
    their text (``1,2,3``).

    psycopg dumps a list of ints element by element in Python; the text form is one ``str.join``
    (a DELETE of 1,000 ids: 0.35 ms instead of 0.75 ms, most of it that dump). Every id goes
    through ``int()``, so the text holds nothing but integers and commas.

    ``string_to_array`` and the element cast are immutable, so the planner folds the expression
    into a constant array: it sees how many ids there are and hashes them for a scan that filters
    rows. ``CAST('{1,2,3}' AS BIGINT[])`` (``array_in``, only stable) stays an expression: the planner
    guessed a few ids, and once a drained backlog had left the primary key much larger than the
    table (vacuum truncates the heap, not the index), it chose a sequential scan that compared every
    row with all 1,000 ids, 1-2.5 s per batch on a 10,000-row table, for each connection's first
    executions (the custom plans before the plan cache settles on a generic one).
    """
    return sa.cast(sa.func.string_to_array(sa.bindparam("row_ids", _id_text(ids), type_=sa.Text()),
                                           sa.literal_column("','")),
                   pg.ARRAY(sa.BigInteger()))


def _id_text(ids: Sequence[int]) -> str:
    """The parameter of :func:`_id_array`: ``1,2,3``, every id through ``int()``."""
    return ",".join(map(str, map(int, ids)))


def _listen(engine: Engine, channel: str, on_wake: Callable[[], None], stop: threading.Event) -> None:
    """LISTEN on ``channel``; on every notification call ``on_wake``. Re-listens after reconnects."""
    import psycopg
    from psycopg import sql

    attempt = 0
    while not stop.is_set():
        try:
            params = engine.url.translate_connect_args(username="user", database="dbname")
            conn = psycopg.connect(autocommit=True, connect_timeout=10, **{k: v for k, v in params.items() if v})
            try:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                if attempt:
                    log.info("LISTEN %s re-established", channel)
                attempt = 0
                on_wake()  # catch up on anything committed while we were not listening
                while not stop.is_set():
                    for _ in conn.notifies(timeout=1.0, stop_after=1):
                        on_wake()
            finally:
                conn.close()
        except Exception as exc:
            attempt += 1
            delay = min(30.0, 0.5 * 2**attempt)
            log.warning("LISTEN %s lost (%s: %s); polling continues, retrying in %.1f s", channel,
                        type(exc).__name__, mask_secrets(exc), delay)
            stop.wait(delay)
