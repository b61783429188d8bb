"""The bad-input catalogue: every case is a test marked ``@pytest.mark.catalogue(...)``.

Each area has its own file (``test_writer_inputs.py``, ``test_cli_inputs.py``, ``test_row_inputs.py``,
``test_message_inputs.py``, ...). A case is one parametrised test, declared as::

    pytest.param(..., id="writer-nul-in-key",
                 marks=pytest.mark.catalogue(area="writer", input="NUL in key",
                                             expected="InvalidKey: 'NUL'"))

``pytest tests/badinput --write-catalogue`` rewrites the table between the ``catalogue`` markers
in docs/guarantees.md from the collected cases and their outcomes; ``test_catalogue_doc.py``
fails when a collected case is missing from that table, when its row is not the one its marks and
outcome ``passed`` would give, or when the table names a case no test declares, so the list cannot drift.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "guarantees.md"
BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"
_CASES = pytest.StashKey[dict[str, dict[str, str]]]()
_FILES = pytest.StashKey[set[str]]()
_OUTCOMES = pytest.StashKey[dict[str, str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "catalogue(area, input, expected): one case of the bad-input catalogue")
    config.stash[_CASES] = {}
    config.stash[_FILES] = set()
    config.stash[_OUTCOMES] = {}


def case_id(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else item.name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cases = config.stash[_CASES]
    for item in items:
        mark = item.get_closest_marker("catalogue")
        if mark is None:
            continue
        cid = case_id(item)
        if cid in cases:
            raise pytest.UsageError(f"bad-input catalogue: case id {cid!r} is used twice")
        cases[cid] = {k: str(v) for k, v in mark.kwargs.items()}
        config.stash[_FILES].add(Path(str(item.path)).name)



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if item.get_closest_marker("catalogue") is not None and (rep.when == "call" or rep.outcome != "passed"):
        item.config.stash[_OUTCOMES][case_id(item)] = rep.outcome


@pytest.fixture
def catalogue_cases(request: pytest.FixtureRequest) -> dict[str, dict[str, str]]:
    return request.config.stash[_CASES]


@pytest.fixture
def catalogue_files(request: pytest.FixtureRequest) -> set[str]:
    """Names of the files the collected cases come from."""
    return request.config.stash[_FILES]


def doc_case_ids() -> set[str]:
    return set(doc_rows())


def doc_rows() -> dict[str, str]:
    """The catalogue table of docs/guarantees.md: case id -> its whole row, as written."""
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return {}
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", table, flags=re.M)}


def doc_row(cid: str, case: dict[str, str], outcome: str) -> str:
    """The table row of one case, as --write-catalogue writes it."""
    return (f"| `{cid}` | {_cell(case.get('area', ''))} | {_cell(case.get('input', ''))} | "
            f"{_cell(case.get('expected', ''))} | {outcome} |")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if not config.getoption("--write-catalogue"):
        return
    cases, outcomes = config.stash[_CASES], config.stash[_OUTCOMES]
    rows = ["| case | area | input | expected | outcome |", "|---|---|---|---|---|"]
    for cid, c in sorted(cases.items(), key=lambda kv: (kv[1].get("area", ""), kv[0])):
        rows.append(doc_row(cid, c, outcomes.get(cid, "not run")))
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{len(cases)} cases.\n\n" + "\n".join(rows) + f"\n{END}{tail}", encoding="utf-8")
