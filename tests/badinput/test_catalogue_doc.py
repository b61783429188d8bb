"""docs/guarantees.md lists every case of the bad-input catalogue, as declared, each with outcome
``passed``, and no case that is gone (regenerate with ``pytest tests/badinput --write-catalogue``)."""

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


def test_each_documented_row_says_what_its_case_declares(catalogue_cases: dict[str, dict[str, str]]) -> None:
    """Input and expected outcome in the doc are the ones the test asserts, not an older wording."""
    if not catalogue_cases:
        pytest.skip("no catalogue case collected in this run (run the tests/badinput folder)")
    rows = _conf.doc_rows()
    stale = [cid for cid, case in sorted(catalogue_cases.items())
             if cid in rows and rows[cid] != _conf.doc_row(cid, case, "passed")]
    assert not stale, (
        f"{len(stale)} row(s) of docs/guarantees.md differ from their case (or do not say 'passed'): "
        f"{[rows[c] for c in stale[:3]]}; run `pytest tests/badinput --write-catalogue`"
    )


def test_the_doc_lists_no_case_that_is_gone(catalogue_cases: dict[str, dict[str, str]],
                                            catalogue_files: set[str]) -> None:
    every_file = {p.name for p in Path(__file__).parent.glob("test_*.py") if p.name != Path(__file__).name}
    every_file = {name for name in every_file if "pytest.mark.catalogue" in (Path(__file__).parent / name).read_text()}
    if not catalogue_files >= every_file:
        pytest.skip(f"not every catalogue file was collected: {sorted(every_file - catalogue_files)}")
    gone = sorted(_conf.doc_case_ids() - set(catalogue_cases))
    assert not gone, f"docs/guarantees.md lists {len(gone)} case(s) no test declares: {gone[:10]}"
    text = _conf.DOC.read_text(encoding="utf-8").split(_conf.BEGIN, 1)[1]
    assert text.lstrip().startswith(f"{len(catalogue_cases)} cases."), text[:40]
