"""docs/guarantees.md lists every case of the fault matrix (regenerate with --write-guarantees)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_faults_conftest", Path(__file__).with_name("conftest.py"))
assert _spec is not None and _spec.loader is not None
_conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conf)


def test_every_collected_case_is_in_the_doc(fault_cases: dict[str, dict[str, str]]) -> None:
    if not fault_cases:
        pytest.skip("no fault case collected in this run (run the tests/faults folder)")
    missing = sorted(set(fault_cases) - _conf.doc_case_ids())
    assert not missing, (
        f"{len(missing)} fault case(s) are not in docs/guarantees.md: {missing[:10]}; "
        "run `pytest tests/faults --write-guarantees`"
    )


def test_the_doc_lists_no_case_the_suite_does_not_have(fault_cases: dict[str, dict[str, str]],
                                                       request: pytest.FixtureRequest) -> None:
    if not fault_cases or request.config.getoption("-k") or request.config.getoption("-m"):
        pytest.skip("a -k/-m selection does not collect the whole matrix")
    stale = sorted(_conf.doc_case_ids() - set(fault_cases))
    assert not stale, f"docs/guarantees.md lists cases the suite no longer has: {stale[:10]}"
