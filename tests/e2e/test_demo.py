"""`tally demo` end to end: the whole system, a wrong identity refused, nothing left behind."""

from __future__ import annotations

import os
import re

from tally.app.launch import run_cli


def test_demo_runs_rotates_refuses_and_cleans_up():
    result = run_cli("demo", "--duration", "10", "--no-live", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "refused (not_allowed)" in out
    summary = re.search(
        r"Summary: (\d+) requests ok, (\d+) failed, (\d+) certificate rotations", out
    )
    assert summary, out
    ok, failed, rotations = (int(g) for g in summary.groups())
    assert ok > 50 and failed == 0 and rotations >= 2
    assert "verified" in out
    bearer = re.search(r"Bearer tokens: (\d+) requests ok, (\d+) failed.*got (\d+)", out)
    assert bearer, out
    assert int(bearer.group(1)) > 0 and bearer.group(2) == "0" and bearer.group(3) == "401"
    workdir = re.search(r"== Tally demo in (\S+)", out).group(1)
    assert not os.path.exists(workdir)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert workdir.encode() not in f.read(), f"process {pid} left behind"
        except OSError:
            pass
