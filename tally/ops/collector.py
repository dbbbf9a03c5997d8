"""The cycle collector's settings for daemons whose heap is large and long-lived.

CPython's full collection walks every tracked object.  A CA holding 10,000 parked
agent connections holds millions of them, and each full pass stopped its event
loop for 0.4 to 1.2 s, every 8 s while agents joined, finding no garbage at all
(`bench.fleet`, with the collector's callbacks timed): that, not the work, set the
CA's renewal p99 at 10,000 agents.  The daemons make little cyclic garbage (a
closed connection is freed by reference counting), so:

1. What is loaded at start (modules, settings, keys) lives as long as the daemon
   and is frozen out of every pass (`freeze_loaded`).
2. A daemon that parks thousands of connections (the CA) runs a full pass after
   `FULL_PASS_EVERY` passes of the middle generation instead of CPython's 10
   (`rare_full_passes`): minutes apart under load rather than seconds.  Young
   objects are collected as before, so a cycle made and dropped within a
   request is freed as soon as ever.
"""

from __future__ import annotations

import gc

FULL_PASS_EVERY = 1000
"""Middle-generation passes between two full ones (CPython's default is 10)."""


def freeze_loaded() -> None:
    """Keep everything allocated so far out of the collector's passes (rule 1)."""
    gc.collect()
    gc.freeze()


def rare_full_passes() -> None:
    """Full passes a hundred times rarer than CPython's default (rule 2)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_PASS_EVERY)
