"""Several CA servers on one PostgreSQL database: joining, and hearing each other.

Rules:

1. **Every server is active.**  Any server answers any agent and any admin
   command; the database is the one truth, and every write is serialized
   there (`ca.engines` rule 1).  Nothing a server holds in memory decides
   anything another server could contradict, except the keys it signs with,
   which it takes up from the database (rule 3).
2. **Joining** (`join`): the first server on an empty database founds the
   cluster and makes the cluster key; a later one registers as pending and
   waits for ``tally ca server approve ID`` run against a server already in
   (`ca.vault` rule 3).  While it waits it logs ``ca.awaiting_approval`` once,
   with the command to run, and serves nothing.
3. **Hearing each other** (`listen`): every committed change that wakes
   long polls also sends a PostgreSQL ``NOTIFY`` (`ca.engines` rule 5).  Each
   server keeps one extra connection that ``LISTEN``s and turns the other
   servers' notices (each names its sender; a server skips its own, which its
   feed heard already) into the same wake-ups its own changes cause: ``agent ID`` wakes that
   agent's entries poll, ``keys`` makes the server take up key changes (and, if
   the bundle moved, wakes every parked poll).  A change made through one
   server so reaches polls parked on every other in a few milliseconds.
4. **A lost listener** reconnects with backoff; notices sent while it was away
   are lost, so on reconnecting it wakes every parked poll once and re-reads
   the keys: a poll that wakes for nothing re-checks and parks again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import trio

from ca.engines import CHANNEL
from ca.store import AuditEvent, Conflict, ServerRecord, Store
from ca.vault import (
    identity_fingerprint,
    load_or_create_identity,
    new_cluster_key,
    public_pem,
    server_id,
    unwrap,
    wrap,
)
from tally.ops.logs import get_logger

log = get_logger("tally.ca")
APPROVAL_POLL = 1.0


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def join(store: Store, data_dir: Path, clock: Callable[[], datetime]) -> tuple[str, bytes]:
    """This server's id and the cluster key, once it is approved (rule 2).

    Blocks (polling the database) while the server waits for approval.
    """
    identity = load_or_create_identity(data_dir)
    public = public_pem(identity)
    sid = server_id(public)
    announced = False
    while True:
        mine = store.get_server(sid)
        if mine is not None and mine.state == "approved" and mine.wrapped_key is not None:
            return sid, unwrap(mine.wrapped_key, identity)
        now = clock()
        if mine is None:
            key = new_cluster_key()
            founder = ServerRecord(
                sid,
                public,
                "approved",
                wrap(key, public),
                int(now.timestamp()),
                int(now.timestamp()),
            )
            first = AuditEvent(_iso(now), "ca", "server.approved", None, sid, {"founder": True})
            if store.first_server(founder, first):
                log.info("ca.cluster_founded", server=sid)
                return sid, key
            pending = ServerRecord(sid, public, "pending", None, int(now.timestamp()), None)
            ev = AuditEvent(
                _iso(now),
                "ca",
                "server.requested",
                None,
                sid,
                {"fingerprint": identity_fingerprint(public)},
            )
            store.request_join(pending, ev)
        if not announced:
            announced = True
            log.warning(
                "ca.awaiting_approval",
                server=sid,
                fingerprint=identity_fingerprint(public),
                detail=f"run `tally ca server approve {sid}` against a CA server already in",
            )
        time.sleep(APPROVAL_POLL)


def listen(
    url: str,
    stop: threading.Event,
    deliver: Callable[[str], None],
    reconnected: Callable[[], None],
) -> None:
    """The blocking LISTEN loop (rules 3 and 4); runs in a thread of its own until ``stop``."""
    import psycopg

    delay = 0.2
    first = True
    while not stop.is_set():
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                if not first:
                    log.info("ca.listener_reconnected")
                    reconnected()
                first = False
                delay = 0.2
                while not stop.is_set():
                    for notice in conn.notifies(timeout=0.5):
                        deliver(notice.payload)
                        if stop.is_set():
                            break
        except psycopg.Error as exc:
            if stop.is_set():
                return
            if not first:
                log.warning("ca.listener_lost", error=str(exc).splitlines()[0] if str(exc) else "")
            first = False
            stop.wait(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


async def run_listener(
    url: str,
    on_notice: Callable[[str], None],
    on_reconnect: Callable[[], None],
) -> None:
    """Run `listen` in a worker thread, handing notices to the trio loop; ends with its task."""
    token = trio.lowlevel.current_trio_token()
    stop = threading.Event()

    def deliver(payload: str) -> None:
        trio.from_thread.run_sync(on_notice, payload, trio_token=token)

    def reconnected() -> None:
        trio.from_thread.run_sync(on_reconnect, trio_token=token)

    try:
        await trio.to_thread.run_sync(
            listen, url, stop, deliver, reconnected, abandon_on_cancel=True
        )
    finally:
        stop.set()


class Membership:
    """The admin side of joining (`ca.vault` rules 3 and 4): list, approve, remove."""

    def __init__(
        self, store: Store, cluster_key: bytes, me: str, clock: Callable[[], datetime]
    ) -> None:
        self.store = store
        self._cluster_key = cluster_key
        self.me = me
        self.clock = clock

    def list(self) -> list[dict[str, object]]:
        return [
            {
                "id": s.id,
                "state": s.state,
                "fingerprint": identity_fingerprint(s.public_key),
                "created_at": s.created_at,
                "approved_at": s.approved_at,
                "this_server": s.id == self.me,
            }
            for s in self.store.list_servers()
        ]

    def approve(self, sid: str, actor: str) -> None:
        """Wrap the cluster key to a pending server's own public key (never sent in clear)."""
        server = self.store.get_server(sid)
        if server is None or server.state != "pending":
            raise LookupError(f"no pending CA server {sid}")
        now = self.clock()
        fp = identity_fingerprint(server.public_key)
        ev = AuditEvent(_iso(now), actor, "server.approved", None, sid, {"fingerprint": fp})
        self.store.approve_server(
            sid, wrap(self._cluster_key, server.public_key), int(now.timestamp()), ev
        )

    def remove(self, sid: str, actor: str) -> None:
        if sid == self.me:
            raise LookupError(f"{sid} is this server; remove it from another one")
        ev = AuditEvent(_iso(self.clock()), actor, "server.removed", None, sid, {})
        try:
            self.store.remove_server(sid, ev)
        except Conflict as exc:
            raise LookupError(str(exc)) from None
