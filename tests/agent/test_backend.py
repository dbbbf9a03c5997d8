"""What the Workload API backend shows a caller: attestation limited to the kinds entries name."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import trio
from cryptography.hazmat.primitives.asymmetric import ec

from agent.backend import AgentBackend
from agent.renewal import Entry, HeldSvid
from tally.ops.net import PeerCred
from tally.spiffe.selectors import Selector
from tests.pki import Authority, now

TD = "spiffe://example.org"
EXE = os.path.realpath(sys.executable)


class Keeper:
    """The keeper's state that `AgentBackend` reads, set by hand."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.roots = [authority.root]
        self.svids: dict[str, HeldSvid] = {}
        self.entries: dict[str, Entry] = {}
        self.version = 0
        self.changed = trio.Event()
        self.halted = None
        self.clock = now
        self.client = type("Client", (), {"jwt": None})()

    def add(self, entry_id: str, spiffe_id: str, selector: Selector) -> None:
        entry = Entry(entry_id, spiffe_id, frozenset({selector}), 1, "")
        svid = self.authority.svid(spiffe_id)
        assert isinstance(svid.key, ec.EllipticCurvePrivateKey)
        t = now()
        self.entries[entry_id] = entry
        self.svids[entry_id] = HeldSvid(
            entry,
            svid.key,
            tuple(svid.chain),
            "1",
            t + timedelta(hours=1),
            t + timedelta(minutes=30),
        )
        self.version += 1
        self.changed.set()
        self.changed = trio.Event()


async def test_a_new_entry_of_a_kind_not_attested_yet_reaches_a_streaming_caller():
    keeper = Keeper(Authority.create("example.org"))
    keeper.add("a", f"{TD}/by-uid", Selector("unix", f"uid:{os.geteuid()}"))
    backend = AgentBackend(keeper, TD)  # type: ignore[arg-type]
    assert backend.kinds() == {"uid"}
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = PeerCred(os.getpid(), os.geteuid(), os.getegid(), a)
    async with backend.watch_x509(peer) as snapshots:
        first = await anext(snapshots)
        assert [s.spiffe_id for s in first.svids] == [f"{TD}/by-uid"]
        # Only uid was gathered so far; the path is read once an entry names one.
        keeper.add("b", f"{TD}/by-path", Selector("unix", f"path:{EXE}"))
        second = await anext(snapshots)
        assert [s.spiffe_id for s in second.svids] == [f"{TD}/by-path", f"{TD}/by-uid"]
        await snapshots.aclose()  # type: ignore[attr-defined]
    assert backend.kinds() == {"uid", "path"}
    a.close()
    b.close()
