"""The fault-injection conformance suite: every case is a test marked ``@pytest.mark.faults(...)``.

A case is one parametrised test of ``test_faults.py``, declared as::

    pytest.param("postgresql", "kafka", "sigkill-mid-batch", id="postgresql-kafka-sigkill-mid-batch",
                 marks=pytest.mark.faults(db="postgresql", broker="kafka", fault="sigkill-mid-batch",
                                          guarantee="..."))

Each case records its numbers (written, delivered, missing, duplicates, out of order, dead, time)
with the ``record_case`` fixture, passing or failing. ``pytest tests/faults --write-guarantees``
rewrites the table between the ``faults`` markers in docs/guarantees.md from the collected cases,
their numbers and their outcomes; ``test_guarantees_doc.py`` fails when a collected case is missing
from that table, so the matrix cannot drift from the suite.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "guarantees.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
_CASES = pytest.StashKey[dict[str, dict[str, str]]]()
_NUMBERS = pytest.StashKey[dict[str, dict[str, Any]]]()
_OUTCOMES = pytest.StashKey[dict[str, str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults(db, broker, fault, guarantee): one case of the fault matrix")
    config.stash[_CASES] = {}
    config.stash[_NUMBERS] = {}
    config.stash[_OUTCOMES] = {}


def case_id(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else item.name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cases = config.stash[_CASES]
    for item in items:
        mark = item.get_closest_marker("faults")
        if mark is None:
            continue
        cid = case_id(item)
        if cid in cases:
            raise pytest.UsageError(f"fault matrix: case id {cid!r} is used twice")
        cases[cid] = {k: str(v) for k, v in mark.kwargs.items()}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if item.get_closest_marker("faults") is None or not (rep.when == "call" or rep.outcome != "passed"):
        return
    result = rep.outcome
    if hasattr(rep, "wasxfail"):
        result = "xfail" if rep.skipped else "xpass"
    item.config.stash[_OUTCOMES][case_id(item)] = result


@pytest.fixture
def record_case(request: pytest.FixtureRequest) -> Any:
    """``record_case(numbers)`` keeps this case's numbers for the matrix (call it before asserting)."""

    def record(numbers: dict[str, Any]) -> None:
        request.config.stash[_NUMBERS][case_id(request.node)] = numbers

    return record


@pytest.fixture
def fault_cases(request: pytest.FixtureRequest) -> dict[str, dict[str, str]]:
    return request.config.stash[_CASES]


def doc_case_ids() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return set()
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _previous_rows() -> dict[str, str]:
    """Rows of the table now in the doc, by case id (kept for cases this run did not execute)."""
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text:
        return {}
    table = text.split(BEGIN, 1)[1].split(END, 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", table, flags=re.M)}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if not config.getoption("--write-guarantees"):
        return
    cases, numbers, outcomes = config.stash[_CASES], config.stash[_NUMBERS], config.stash[_OUTCOMES]
    if not cases:
        return
    previous = _previous_rows()
    order = {"postgresql": 0, "mariadb": 1, "kafka": 0, "rabbitmq": 1}
    rows = ["| case | database | broker | fault | written | delivered | missing | duplicates (bound) "
            "| out of order keys | dead | time (s) | outcome | guarantee |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for cid, c in sorted(cases.items(), key=lambda kv: (kv[1].get("fault", ""), order.get(kv[1].get("db", ""), 9),
                                                         order.get(kv[1].get("broker", ""), 9))):
        n = numbers.get(cid)
        if n is None and cid in previous and cid not in outcomes:
            rows.append(previous[cid])  # not run this time: keep the last measured row
            continue
        if n is None:
            cells = ["", "", "", "", "", "", ""]
        else:
            cells = [n["written"], n["delivered"], n["missing"], f"{n['duplicates']} (≤ {n['bound']})",
                     n["out_of_order"], n["dead"], f"{n['seconds']:.1f}"]
        rows.append(f"| `{cid}` | {c.get('db', '')} | {c.get('broker', '')} | {_cell(c.get('fault', ''))} | "
                    + " | ".join(_cell(x) for x in cells)
                    + f" | {outcomes.get(cid, 'not run')} | {_cell(c.get('guarantee', ''))} |")
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{len(cases)} cases.\n\n" + "\n".join(rows) + f"\n{END}{tail}", encoding="utf-8")
