"""docs/guarantees.md lists every case of the bad-input catalogue (regenerate with --write-catalogue)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_badinput_conftest", Path(__file__).with_name("conftest.py"))
assert _spec is not None and _spec.loader is not None
_conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conf)

MIN_CASES = 60


def test_every_collected_case_is_in_the_doc(catalogue_cases: dict[str, dict[str, str]]) -> None:
    if not catalogue_cases:
        pytest.skip("no catalogue case collected in this run (run the tests/badinput folder)")
    missing = sorted(set(catalogue_cases) - _conf.doc_case_ids())
    assert not missing, (
        f"{len(missing)} catalogue case(s) are not in docs/guarantees.md: {missing[:10]}; "
        "run `pytest tests/badinput --write-catalogue`"
    )


def test_the_catalogue_is_large_enough(catalogue_cases: dict[str, dict[str, str]], request: pytest.FixtureRequest
                                      ) -> None:
    selected = request.config.getoption("-k") or request.config.getoption("-m")
    if selected:
        pytest.skip("a -k/-m selection does not collect the whole catalogue")
    documented = _conf.doc_case_ids()
    assert len(documented) >= MIN_CASES, f"docs/guarantees.md lists {len(documented)} cases, want >= {MIN_CASES}"
