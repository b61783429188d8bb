"""Idempotency helpers for handlers: optimistic versions and state-machine guards.

Dedup makes a message's effects happen once. These make the effects safe against *other*
messages arriving out of order or twice under different ids: an update that expects a version,
and a state change that is a no-op when repeated and refused when illegal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from outbox.errors import ConfigurationError, IllegalTransition, StaleVersion

__all__ = ["StateMachine", "versioned_update"]


def _table_of(table: Any) -> sa.Table:
    if isinstance(table, sa.Table):
        return table
    inner = getattr(table, "__table__", None)
    if isinstance(inner, sa.Table):
        return inner
    raise ConfigurationError(f"expected a sqlalchemy Table or a mapped class, got {table!r}")


def _column(t: sa.Table, name: str, what: str) -> sa.Column[Any]:
    if name not in t.c:
        raise ConfigurationError(f"{what} {name!r} is not a column of table {t.name!r}")
    return t.c[name]


def versioned_update(
    session: Session,
    table: Any,
    id_value: Any,
    expected_version: int,
    values: Mapping[str, Any],
    *,
    id_column: str = "id",
    version_column: str = "version",
) -> int:
    """``UPDATE table SET ..., version = version + 1 WHERE id = :id AND version = :expected``.

    Returns the new version. Raises :class:`~outbox.errors.StaleVersion` when no row matched (the
    version moved on, or the row does not exist), saying which.
    """
    t = _table_of(table)
    id_col = _column(t, id_column, "id_column")
    ver_col = _column(t, version_column, "version_column")
    for name in values:
        _column(t, name, "value")
        if name in (id_column, version_column):
            raise ConfigurationError(f"values must not set {name!r}: versioned_update manages it")
    stmt = (
        t.update()
        .where(id_col == id_value, ver_col == expected_version)
        .values({**dict(values), version_column: ver_col + 1})
    )
    if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
        return int(expected_version) + 1
    current = session.execute(sa.select(ver_col).where(id_col == id_value)).first()
    if current is None:
        raise StaleVersion(f"{t.name} {id_column}={id_value!r}: no such row (expected version {expected_version})")
    raise StaleVersion(
        f"{t.name} {id_column}={id_value!r}: expected version {expected_version}, but the row is at version "
        f"{current[0]} (changed by someone else: reload and decide again)"
    )


class StateMachine:
    """Allowed transitions, e.g. ``StateMachine({"pending": {"paid", "cancelled"}, "paid": {"shipped"}})``.

    :meth:`transition` says whether to act: ``True`` for a legal change, ``False`` for a repeat
    (current == target, a no-op), :class:`~outbox.errors.IllegalTransition` for anything else.
    :meth:`apply` does the same on a row, atomically, with one conditional UPDATE.
    """

    def __init__(self, transitions: Mapping[str, Iterable[str]]) -> None:
        if not isinstance(transitions, Mapping) or not transitions:
            raise ConfigurationError("transitions must be a non-empty mapping of state -> allowed next states")
        self.transitions: dict[str, frozenset[str]] = {}
        for source, targets in transitions.items():
            if isinstance(targets, str):
                raise ConfigurationError(f"next states of {source!r} must be a collection of str, not a str")
            self.transitions[str(source)] = frozenset(str(t) for t in targets)
        self.states = frozenset(self.transitions) | frozenset().union(*self.transitions.values())

    def can(self, current: str, target: str) -> bool:
        return target in self.transitions.get(current, frozenset())

    def sources_of(self, target: str) -> list[str]:
        return sorted(s for s, targets in self.transitions.items() if target in targets)

    def transition(self, current: str, target: str) -> bool:
        if target not in self.states:
            raise IllegalTransition(f"unknown state {target!r} (known: {', '.join(sorted(self.states))})")
        if current == target:
            return False
        if not self.can(current, target):
            allowed = ", ".join(sorted(self.transitions.get(current, ()))) or "none"
            raise IllegalTransition(f"cannot go from {current!r} to {target!r} (allowed from {current!r}: {allowed})")
        return True

    def apply(
        self,
        session: Session,
        table: Any,
        id_value: Any,
        target: str,
        *,
        id_column: str = "id",
        state_column: str = "status",
        values: Mapping[str, Any] | None = None,
    ) -> bool:
        """Move row ``id_value`` to ``target`` if its current state allows it, in one conditional UPDATE.

        ``True``: changed (``values`` written too). ``False``: already in ``target`` (nothing written).
        Raises :class:`IllegalTransition` for an illegal move or a missing row.
        """
        t = _table_of(table)
        id_col = _column(t, id_column, "id_column")
        state_col = _column(t, state_column, "state_column")
        if target not in self.states:
            raise IllegalTransition(f"unknown state {target!r} (known: {', '.join(sorted(self.states))})")
        sources = self.sources_of(target)
        if sources:
            stmt = (
                t.update()
                .where(id_col == id_value, state_col.in_(sources))
                .values({**dict(values or {}), state_column: target})
            )
            if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
                return True
        row = session.execute(sa.select(state_col).where(id_col == id_value)).first()
        if row is None:
            raise IllegalTransition(f"{t.name} {id_column}={id_value!r}: no such row, cannot move it to {target!r}")
        if self.transition(str(row[0]), target):  # the state moved between the UPDATE and the SELECT
            raise IllegalTransition(f"{t.name} {id_column}={id_value!r} changed state concurrently; try again")
        return False
