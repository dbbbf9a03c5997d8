"""When to renew an SVID: before half its life is gone, never all at once.

Rules:

1. Renewal is due in a window that ends *before* the half-life mark
   (`WINDOW` as fractions of the lifetime), so the successor is in hand, and
   pushed to workloads, by the time half the old SVID's life is gone.
2. Where in the window is chosen at random once per SVID, so a fleet issued
   in the same second does not renew in lock-step (the CA would otherwise see
   every agent at once, every half hour).
3. Pure: the caller passes the certificate's times and its own random source,
   so tests pin both.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

WINDOW = (0.38, 0.48)


def renewal_time(not_before: datetime, not_after: datetime, rng: random.Random) -> datetime:
    life = (not_after - not_before).total_seconds()
    fraction = rng.uniform(*WINDOW)
    return not_before + timedelta(seconds=life * fraction)


def backoff(attempt: int, rng: random.Random, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Capped exponential backoff with full jitter for retries against the CA."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return rng.uniform(ceiling / 2, ceiling)
