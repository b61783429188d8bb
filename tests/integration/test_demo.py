"""The README's first command: `outbox demo` runs the whole pipeline and prints its summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.kafka
def test_outbox_demo_runs_end_to_end_and_reports_exactly_once(tmp_path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "outbox", "demo", "--orders", "300", "--replay", "40"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"orders written\s+300 ", out)
    assert re.search(r"messages published\s+300$", out, re.M)
    assert re.search(r"duplicates ignored\s+40 \(of 40 replayed\)", out)
    assert re.search(r"effects applied\s+300 \(exactly one per order: yes\)", out)
    assert "end-to-end latency" in out
    assert not list(tmp_path.glob("outbox-demo-*")), "the demo must clean up its temporary folder"
