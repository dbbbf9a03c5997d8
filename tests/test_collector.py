"""The cycle collector's settings for the daemons (`tally.ops.collector`), checked in a
fresh interpreter so the suite's own collector is left as it is."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
from tally.ops import collector
before = gc.get_threshold()
collector.freeze_loaded()
collector.rare_full_passes()
print(json.dumps({"before": before, "after": gc.get_threshold(),
                  "frozen": gc.get_freeze_count()}))
"""


def test_loaded_objects_are_frozen_and_full_passes_come_a_hundred_times_rarer() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    got = json.loads(out.stdout)
    assert got["frozen"] > 1000  # the modules loaded by then
    young, middle, full = got["before"]
    assert got["after"] == [young, middle, 1000]
    assert full * 100 == 1000  # CPython's default of 10, a hundred times rarer
