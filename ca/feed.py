"""Who a change concerns, and the wake-ups that tell only them (the CA's change feed).

Rules:

1. **A change wakes whom it concerns, nobody else.**  Every parked long poll
   waits under a key (the calling agent's SPIFFE ID for ``/v1/entries``, one
   shared key for ``/v1/bundle``).  An entry change wakes the agents whose
   authorized set it changes (`concerned_agents`); a renewal, an eviction or
   a ban wakes that one agent; a bundle change wakes every parked poll, once
   (agents hear of the bundle on their entries poll: ``ca.api`` rule 7).
   So the CA's work per change grows with the agents it concerns, never with
   the agents connected: with one broadcast event, every renewal of a fleet
   of N agents cost N datastore checks, and the fleet's cost grew as N².
2. **No wake-up is lost.**  A poll registers its wake-up *before* it checks
   the datastore, so a change that commits while the check runs (in the
   worker thread) still finds it registered and the poll checks again.
3. **Counted.**  `wakeups` counts parked polls woken; `checks` counts the
   datastore checks polls made (one when a poll arrives, one per wake-up).
   ``tally_ca_poll_wakeups_total`` and ``tally_ca_poll_checks_total`` show
   them; a renewal that moves either by more than one is a regression.
4. **A quiet key is not checked again on arrival.**  When a poll ends quiet
   (it ran out parked after a check that found nothing), the caller notes
   what it told the poller (`note_quiet`); every wake-up of that key, and
   every `wake_all`, forgets it.  A poll that comes back with exactly that
   parks without asking the datastore: nothing concerning its key has
   happened since the last check, or its key would have been woken.  An
   idle fleet's polls then cost no datastore hop at all, only the round trip.

`concerned_agents` is the pure core: an agent is served the entries whose
``parent_id`` is its SPIFFE ID (`ca.authority.Authority.entries_for`), so a
change concerns the entry's parent before the change and its parent after.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Protocol

import trio

BUNDLE = "*bundle*"
"""The one key every bundle poll waits under."""


class HasParent(Protocol):
    @property
    def parent_id(self) -> str: ...


def concerned_agents(before: HasParent | None, after: HasParent | None) -> frozenset[str]:
    """The agents whose authorized entry set a change from ``before`` to ``after`` alters.

    ``before`` is None for a creation, ``after`` None for a deletion.  An update
    that moves an entry to another agent concerns both: one loses it, one gains it.
    An update that keeps the parent concerns that parent even when no field the
    agent reads has changed, because the entry's revision has.
    """
    return frozenset(e.parent_id for e in (before, after) if e is not None)


class ChangeFeed:
    """Parked long polls by key, woken only for their key (rule 1)."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[trio.Event]] = {}
        self._quiet: dict[str, Hashable] = {}
        """Keys whose last poll ended quiet, and what it was told (rule 4)."""
        self._stopped = False
        self.wakeups_by: Counter[str] = Counter()
        """Polls woken, by the cause the waker named (``entry``, ``renewal``, ...)."""
        self.checks = 0

    @property
    def wakeups(self) -> int:
        return sum(self.wakeups_by.values())

    @property
    def parked(self) -> int:
        """Polls waiting right now."""
        return sum(len(events) for events in self._waiting.values())

    def wake(self, keys: Iterable[str], cause: str = "entry") -> int:
        """Wake the polls parked under ``keys``; how many were woken."""
        woken = 0
        for key in keys:
            self._quiet.pop(key, None)  # rule 4, whether or not a poll is parked
            events = self._waiting.pop(key, None)
            if not events:
                continue
            for event in events:
                event.set()
            woken += len(events)
        if woken:
            self.wakeups_by[cause] += woken
        return woken

    def wake_all(self, cause: str = "bundle") -> int:
        """Wake every parked poll (a bundle change, the server stopping)."""
        self._quiet.clear()
        return self.wake(list(self._waiting), cause)

    def note_quiet(self, key: str, told: Hashable) -> None:
        """A poll under ``key`` ended quiet and was told ``told`` (rule 4).  Call it
        in the same step as `wait_until` returned (no ``await`` between)."""
        self._quiet[key] = told

    def stop(self) -> None:
        """The server is stopping: parked polls answer now, and new ones do not park."""
        self._stopped = True
        self.wake_all("stop")

    async def wait_until(
        self,
        key: str,
        changed: Callable[[], Awaitable[bool]],
        seconds: float,
        told: Hashable = None,
    ) -> bool:
        """Return once ``changed()`` is true, the server stops, or ``seconds`` pass.

        True when the wait was *quiet*: it ran out parked, after a check that found
        nothing and with no wake-up since.  Nothing concerning ``key`` has happened
        since that check, so the caller may answer without asking the datastore again.
        ``told``: what the poller says it was told last; when that is what the key's
        last quiet poll was told, the first check is skipped (rule 4).
        """
        quiet = False
        skip = told is not None and self._quiet.get(key) == told
        with trio.move_on_after(seconds):
            while not self._stopped:
                event = trio.Event()
                self._waiting.setdefault(key, set()).add(event)  # before the check (rule 2)
                try:
                    if not skip:
                        self.checks += 1
                        if await changed():
                            return False
                    skip = False
                    quiet = True
                    await event.wait()
                    quiet = False
                finally:
                    events = self._waiting.get(key)
                    if events is not None:
                        events.discard(event)
                        if not events:
                            del self._waiting[key]
        return quiet
