"""Ids that differ only in case, trailing spaces or accents are different ids (lossless dedup).

On MariaDB/MySQL a column takes the server's default collation (``utf8mb4_general_ci``: case-
and accent-insensitive, PAD SPACE), under which ``"abc"`` after ``"ABC"`` would be taken for a
duplicate and silently skipped. The id columns are binary and NO PAD there (``outbox.types.ExactString``,
migration 0003), so every dialect keeps them apart.
"""

from __future__ import annotations

import pytest

from consumers import Status

pytestmark = pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql", "mariadb"], indirect=True)


def test_ids_that_differ_in_case_space_or_accent_are_distinct(dialect_name, engine, effects, count_effects,
                                                              recorder_cls, make_message):
    consumer = recorder_cls()
    batch = [make_message(msg_id=i) for i in ("ABC", "abc", "a", "a ", "e", "é")]
    outcomes = consumer.process_batch(engine, batch)
    assert [o.status for o in outcomes] == [Status.PROCESSED] * 6
    assert count_effects() == 6
