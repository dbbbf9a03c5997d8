"""Remediation hooks, the pure half: what a hook is, what it is sent, and which events it gets.

A hook turns a log event (``rotation.failed``, ``svid.expired``, ``peer.denied``,
``audit.broken`` ...) into an action outside the daemon: a command run with the
event on stdin, or a POST to a webhook.  `tally.ops.hooks` moves the bytes;
this module decides, with no clock of its own and no I/O (but for `check_hooks`, which
checks at load time that a ``ca_file`` exists).

Rules:

1. A hook is declared as a TOML table (``[[hooks]]``) with ``on`` (the event
   names) and exactly one of ``command`` (an argv list, run without a shell) or
   ``url``.  A URL is ``https://`` and verified against the system roots or
   ``ca_file``; plain ``http://`` only to a loopback host, where no network can
   read or change it.  Every mistake is a one-line `HookError` naming
   ``hooks[i].key``.
2. The payload names the daemon, the identity concerned, the reason and what
   to do about it (`ADVICE`).  Its ``detail`` is the log line's own fields,
   cleaned by the same redaction as the log (`tally.ops.logs` rule 3): a hook
   can never carry more than the log already does, and never a secret.
3. Each hook has a bounded `Outbox`.  A repeat of an event that is still
   waiting (same event, identity and reason) is folded into it (``repeats``);
   one that comes within ``coalesce`` seconds of the last delivery of its kind
   is held back and counted into the next one.  A full outbox drops the new
   event and counts it.  So a flood costs a bounded amount of memory and a
   pager gets one call per trouble, not one per retry.
4. Events about hooks themselves (``hook.*``) are never forwarded, so a
   failing hook cannot feed itself.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from tally.ops.config import ConfigError, Table, is_loopback
from tally.ops.logs import clean_fields

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_RETRIES: Final = 3
DEFAULT_QUEUE: Final = 64
DEFAULT_COALESCE: Final = 300.0
_KEYS: Final = frozenset(
    {"on", "command", "url", "ca_file", "timeout", "retries", "queue", "coalesce"}
)

ADVICE: Final[Mapping[str, str]] = {
    "rotation.failed": "the agent could not renew from the CA: check that the CA is up and "
    "reachable from this node (reason says how it failed); held SVIDs keep serving until "
    "they expire",
    "svid.expired": "an SVID expired without a successor and was dropped: its workload has no "
    "identity now; restore the agent's path to the CA, or re-register the entry",
    "agent.evicted": "the CA evicted this agent: its SVIDs will not renew; issue a new join "
    "token for the node if it should stay",
    "ready.lost": "the daemon reports not ready: see its /readyz for why",
    "peer.denied": "a peer was refused at the proxy (reason says why): check the caller's "
    "identity, its rotation, or the allow rules",
    "audit.broken": "the CA's audit chain no longer verifies: treat the datastore as "
    "tampered with; run 'tally ca audit verify' and restore from a trusted copy",
    "connection.peer_expired": "a connection was cut because the peer's certificate expired "
    "or got older than max_peer_age: the peer is not rotating",
    "identity.update_rejected": "the proxy refused a new SVID and keeps the old one: check "
    "the agent's registration for this workload",
    "key.rotation_failed": "the CA could not rotate its signing key: check its data dir",
}
DEFAULT_ADVICE: Final = "see this daemon's log around ts for the event"
_IDENTITY_FIELDS: Final = ("spiffe_id", "peer_id", "agent_id")


class HookError(ValueError):
    """A hook declaration that cannot be used; the message names it (``hooks[i].key``)."""


@dataclass(frozen=True)
class HookSpec:
    """One declared hook, checked (rule 1)."""

    on: frozenset[str]
    command: tuple[str, ...] | None = None
    url: str | None = None
    ca_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    queue: int = DEFAULT_QUEUE
    coalesce: float = DEFAULT_COALESCE

    def describe(self) -> str:
        """For logs: the command's program, or the URL's scheme and host (never its path or
        query, where webhook services put their tokens)."""
        if self.command is not None:
            return f"command {self.command[0]}"
        parts = urlsplit(self.url or "")
        return f"url {parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _number(where: str, value: object, *, minimum: float, integer: bool) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool):
        raise HookError(f"{where}: expected {'an integer' if integer else 'a number'}")
    assert isinstance(value, int | float)
    if not math.isfinite(value) or value < minimum:  # no "inf = forever", and no NaN
        raise HookError(f"{where}: must be at least {minimum:g} and finite")
    return value


def _url(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise HookError(f"{where}: expected a string")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise HookError(f"{where}: not a URL: {exc}") from exc
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise HookError(f"{where}: expected https://HOST/PATH")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise HookError(
            f"{where}: plain http is only allowed to a loopback host; "
            "use https:// (verified like the rest of Tally)"
        )
    return value


def parse_hook(i: int, table: Mapping[str, object]) -> HookSpec:
    where = f"hooks[{i}]"
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise HookError(
            f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_KEYS))})"
        )
    on = table.get("on")
    if not isinstance(on, list) or not on or not all(isinstance(e, str) and e for e in on):
        raise HookError(f"{where}.on: expected a non-empty array of event names")
    if any(e.startswith("hook.") for e in on):
        raise HookError(f"{where}.on: hook.* events cannot trigger hooks (rule 4)")
    has_command, has_url = "command" in table, "url" in table
    if has_command == has_url:
        raise HookError(f"{where}: give exactly one of 'command' (an argv array) or 'url'")
    command: tuple[str, ...] | None = None
    if has_command:
        raw = table["command"]
        if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
            raise HookError(f"{where}.command: expected a non-empty array of strings (no shell)")
        if not raw[0]:
            raise HookError(f"{where}.command: the program name is empty")
        command = tuple(raw)
    url = _url(f"{where}.url", table["url"]) if has_url else None
    ca_file = table.get("ca_file")
    if ca_file is not None:
        if not isinstance(ca_file, str) or not ca_file:
            raise HookError(f"{where}.ca_file: expected a path")
        if url is None or not url.startswith("https:"):
            raise HookError(f"{where}.ca_file: only an https url uses a ca_file")
    return HookSpec(
        on=frozenset(on),
        command=command,
        url=url,
        ca_file=ca_file,
        timeout=_number(
            f"{where}.timeout", table.get("timeout", DEFAULT_TIMEOUT), minimum=0.1, integer=False
        ),
        retries=int(
            _number(
                f"{where}.retries", table.get("retries", DEFAULT_RETRIES), minimum=0, integer=True
            )
        ),
        queue=int(
            _number(f"{where}.queue", table.get("queue", DEFAULT_QUEUE), minimum=1, integer=True)
        ),
        coalesce=_number(
            f"{where}.coalesce", table.get("coalesce", DEFAULT_COALESCE), minimum=0, integer=False
        ),
    )


def parse_hooks(tables: Sequence[Mapping[str, object]]) -> tuple[HookSpec, ...]:
    """Read ``[[hooks]]`` tables as TOML or a flag gave them (rule 1)."""
    return tuple(parse_hook(i, table) for i, table in enumerate(tables))


HOOKS_HELP: Final = (
    "remediation hooks: [[hooks]] tables with on = [event names] and either command = [argv] "
    '(run with the event as JSON on stdin, no shell) or url = "https://..." (POST of the '
    "event as JSON); optional timeout (10), retries (3), queue (64), coalesce (300, seconds), "
    "ca_file (PEM roots for the url); as a flag, one inline table per --hook"
)


def check_hooks(tables: Sequence[Table]) -> tuple[HookSpec, ...]:
    """`parse_hooks` for a settings ``validate``: a mistake is a one-line `ConfigError`.

    The one look outside: a ``ca_file`` that is not there is said at start (or at the
    SIGHUP that names it), not at the first delivery, when nobody is watching.
    """
    try:
        specs = parse_hooks(tables)
    except HookError as exc:
        raise ConfigError(f"setting 'hooks': {exc}") from exc
    for i, spec in enumerate(specs):
        if spec.ca_file is not None and not Path(spec.ca_file).is_file():
            raise ConfigError(f"setting 'hooks': hooks[{i}].ca_file {spec.ca_file}: no such file")
    return specs


# -- what a hook is sent --------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One log event a hook subscribed to, reduced to what a payload may carry (rule 2)."""

    name: str
    ts: str
    identity: str | None
    reason: str
    detail: Mapping[str, Any]

    @property
    def key(self) -> tuple[str, str | None, str]:
        """What makes two events "the same trouble" for coalescing (rule 3)."""
        return (self.name, self.identity, self.reason)


def event_of(name: str, ts: str, fields: Mapping[str, object], own_identity: str | None) -> Event:
    """Build an `Event` from a log line's name and fields; secrets are redacted (rule 2)."""
    detail = clean_fields(fields)
    identity = next(
        (str(detail[f]) for f in _IDENTITY_FIELDS if isinstance(detail.get(f), str)), own_identity
    )
    reason = detail.get("reason")
    return Event(name, ts, identity, str(reason) if reason is not None else name, detail)


def payload(daemon: str, host: str, event: Event, repeats: int) -> dict[str, Any]:
    """The JSON document a hook receives (rule 2)."""
    return {
        "daemon": daemon,
        "host": host,
        "event": event.name,
        "ts": event.ts,
        "identity": event.identity,
        "reason": event.reason,
        "action": ADVICE.get(event.name, DEFAULT_ADVICE),
        "repeats": repeats,
        "detail": dict(event.detail),
    }


# -- the outbox (rule 3) -----------------------------------------------------------------------

QUEUED: Final = "queued"
COALESCED: Final = "coalesced"
DROPPED: Final = "dropped"


@dataclass
class Pending:
    event: Event
    repeats: int = 0


@dataclass
class Outbox:
    """One hook's bounded queue with coalescing; times are the caller's (trio) seconds."""

    capacity: int
    coalesce: float
    _queue: deque[Pending] = field(default_factory=deque)
    _waiting: dict[tuple[str, str | None, str], Pending] = field(default_factory=dict)
    _sent_at: dict[tuple[str, str | None, str], float] = field(default_factory=dict)
    _held: dict[tuple[str, str | None, str], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._queue)

    def offer(self, event: Event, now: float) -> str:
        """Take an event: QUEUED, COALESCED (folded into another) or DROPPED (full)."""
        key = event.key
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.repeats += 1
            return COALESCED
        sent = self._sent_at.get(key)
        if sent is not None and now - sent < self.coalesce:
            self._held[key] = self._held.get(key, 0) + 1
            return COALESCED
        if len(self._queue) >= self.capacity:
            return DROPPED
        item = Pending(event, self._held.pop(key, 0))
        self._queue.append(item)
        self._waiting[key] = item
        return QUEUED

    def take(self, now: float) -> Pending | None:
        """The next event to deliver, with every repeat folded into it, or None."""
        if not self._queue:
            return None
        item = self._queue.popleft()
        key = item.event.key
        del self._waiting[key]
        self._sent_at[key] = now
        if len(self._sent_at) > 4 * self.capacity:
            # Forget windows that have closed, with what they held back: those repeats were
            # counted as coalesced when they came, and no new event of their kind followed.
            for k, t in list(self._sent_at.items()):
                if now - t >= self.coalesce:
                    del self._sent_at[k]
                    self._held.pop(k, None)
        return item

    def held(self) -> int:
        """Repeats held back by the coalescing window, not yet in any delivery."""
        return sum(self._held.values())
