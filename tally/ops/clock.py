"""The one wall clock.

Daemons take a clock argument so that tests inject one; this is the default
they all share.  Certificates are stamped in UTC, so the clock answers in UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def wall_clock() -> datetime:
    return datetime.now(UTC)
