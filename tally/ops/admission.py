"""Connection caps for local sockets: how many at once, and how many per uid.

Rules:

1. A cap is checked when a connection is accepted, before anything is read
   from it; over a cap the caller closes it at once (it is never queued, so a
   flood holds no more than the caps).  Accepting and closing, rather than
   leaving it in the backlog, gives the peer a prompt answer.
2. The per-uid cap uses the uid the kernel recorded (``SO_PEERCRED``), so one
   local user flooding a socket leaves room for every other user.
3. Refusals are counted by reason for the metrics, and logged once per burst:
   the first refusal after a quiet spell of ``BURST_QUIET_S`` is reported with
   how many were refused since the last report, so a flood cannot flood the log.

Pure bookkeeping, no I/O: callers pass the time in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

BURST_QUIET_S = 10.0

TOTAL = "max_connections"
PER_UID = "max_connections_per_uid"


@dataclass
class Admission:
    """Open connections against the caps; ``per_uid`` None means no per-uid cap."""

    total: int
    per_uid: int | None = None
    open: int = 0
    by_uid: Counter[int] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    """Refused connections by reason (``TOTAL`` or ``PER_UID``)."""
    _last_refusal: float | None = None
    _unreported: int = 0

    def admit(self, uid: int | None) -> str | None:
        """Take a slot for a connection from ``uid``; the reason it is refused, or None.

        Every admitted connection must be given back with :meth:`release`.
        """
        if self.open >= self.total:
            return self._refuse(TOTAL)
        if uid is not None and self.per_uid is not None and self.by_uid[uid] >= self.per_uid:
            return self._refuse(PER_UID)
        self.open += 1
        if uid is not None:
            self.by_uid[uid] += 1
        return None

    def release(self, uid: int | None) -> None:
        self.open -= 1
        if uid is not None:
            self.by_uid[uid] -= 1
            if self.by_uid[uid] <= 0:
                del self.by_uid[uid]

    def _refuse(self, reason: str) -> str:
        self.refused[reason] += 1
        self._unreported += 1
        return reason

    def report(self, now: float) -> int | None:
        """After a refusal: how many to log now (first of a burst), or None to stay quiet."""
        last, self._last_refusal = self._last_refusal, now
        if last is not None and now - last < BURST_QUIET_S:
            return None
        count, self._unreported = self._unreported, 0
        return count
