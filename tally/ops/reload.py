"""SIGHUP reload, the part every daemon shares: re-read, diff, keep what cannot change.

A daemon reloads by calling `reread` with the settings in force, a loader
that reads the ``--config`` file again with the flags of the start (so
flags keep winning, as at start), and the names of its restart-only
settings.  It then applies the live settings it got back.

Rules:

1. A bad file (unreadable, invalid TOML, an unknown key, a bad value, a
   failed cross-check) changes nothing: one ``config.reload_failed`` line
   names the problem and the old settings stay in force.
2. A changed restart-only setting (a listen address, a socket, the data dir,
   the trust domain) keeps its old value; one ``config.restart_required``
   line names every such key, never their values (a key may be a secret).
3. The loader runs in a worker thread: reading a file must not stall the
   event loop that keeps connections alive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import trio

from tally.ops.config import ConfigError
from tally.ops.logs import EventLogger

T = TypeVar("T")


def restart_only_changes(old: object, new: object, restart_only: Iterable[str]) -> list[str]:
    """The restart-only settings whose value differs between ``old`` and ``new``."""
    return [name for name in restart_only if getattr(new, name) != getattr(old, name)]


def keep_restart_only(old: T, new: T, restart_only: Iterable[str]) -> tuple[T, list[str]]:
    """``new`` with every changed restart-only setting put back to its ``old`` value."""
    fixed = restart_only_changes(old, new, restart_only)
    if not fixed:
        return new, fixed
    kept: dict[str, Any] = {name: getattr(old, name) for name in fixed}
    return dataclasses.replace(new, **kept), fixed  # type: ignore[type-var]


async def reread(
    current: T, load: Callable[[], T], restart_only: Iterable[str], log: EventLogger
) -> T | None:
    """The settings to apply after a SIGHUP, or None when the file is bad (rule 1)."""
    try:
        new = await trio.to_thread.run_sync(load)
    except ConfigError as exc:
        log.warning("config.reload_failed", error=str(exc))
        return None
    merged, fixed = keep_restart_only(current, new, restart_only)
    if fixed:
        log.warning("config.restart_required", settings=fixed)
    return merged
