"""`tally demo` end to end: the whole system, a wrong identity refused, nothing left behind,
and the CA's console showing the demo's rotations while it runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request

from tally.app.launch import tally_argv


def _snapshot(url: str) -> dict:
    with urllib.request.urlopen(url + "api/snapshot", timeout=5) as resp:
        return json.loads(resp.read())


def test_demo_runs_rotates_refuses_and_cleans_up():
    proc = subprocess.Popen(
        tally_argv("demo", "--duration", "10", "--no-live"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        console = re.match(r"Console: (http://127\.0\.0\.1:\d+/) ", first)
        assert console, first
        url = console.group(1)
        # While the demo runs, its workloads' rotations are on the console.
        deadline = time.monotonic() + 30
        while True:
            snap = _snapshot(url)
            rotated = [
                e
                for e in snap["timeline"]["events"]
                if e["event"] == "svid.issued" and e["detail"].get("kind") == "workload"
            ]
            if len(snap["entries"]) == 2 and len(rotated) >= 4:
                break
            assert time.monotonic() < deadline, snap["timeline"]["counts"]
            time.sleep(0.5)
        assert [a["health"] for a in snap["agents"]] == ["ok"]
        out = proc.stdout.read()  # to the end: the demo stops itself after --duration
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    out = first + out
    assert proc.returncode == 0, out
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
