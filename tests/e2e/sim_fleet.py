"""Simulated agents of `bench.fleet` beside the real daemons of an end-to-end drill.

Each has its own join token, key and SVID, and the real agent API client
(`agent.ca_client.CAClient`) given every CA server, so it fails over as an agent
does; they run in a thread with their own trio loop, and every call that failed in
the end (after moving to another server) is counted by code in `SimFleet.errors`.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime

import trio

from agent.ca_client import CAClient, make_csr
from bench.fleet import Admin, SimAgent, Stats, joiner
from tally.ops.config import Address
from tally.spiffe import x509profile
from tests.e2e.conftest import CA
from tests.e2e.test_ca import TD, bundle_roots


class SimFleet:
    """``size`` simulated agents on both servers, in a thread with its own trio loop."""

    def __init__(self, a: CA, b: CA, size: int) -> None:
        self.size = size
        self.admin_socket = a.admin_socket
        self.servers = [Address.parse(a.listen), Address.parse(b.listen)]
        self.roots = bundle_roots(a)
        self.stats = Stats()
        self.agents: list[SimAgent] = []
        self.joined = threading.Event()
        self.failed: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self.joined.wait(120) and self.failed is None, self.failed

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported by the test thread
            self.failed = exc
            self.joined.set()

    async def _run(self) -> None:
        self._token, self._stop = trio.lowlevel.current_trio_token(), trio.Event()
        admin = Admin(self.admin_socket)
        csr = make_csr(x509profile.generate_key())
        for i in range(self.size):
            agent = SimAgent(i, self.servers[0], self.roots, csr, self.stats)
            agent.client = CAClient(self.servers, TD, self.roots, timeout=60)
            self.agents.append(agent)
        # As `bench.fleet.register_fleet`, in this trust domain rather than the bench's.
        tokens, specs = [], []
        for agent in self.agents:
            made = await admin.call("POST", "/v1/tokens", {})
            tokens.append(made["token"])
            specs.append(
                {"spiffe_id": f"spiffe://{TD}/sim/{agent.n}", "parent_id": made["spiffe_id"],
                 "selectors": ["unix:uid:1000"]}
            )  # fmt: skip
        await admin.call("POST", "/v1/entries/batch", {"entries": specs})
        await admin.http.aclose()
        join = joiner(2.0, self.stats)  # joins spread over 2 s
        async with trio.open_nursery() as nursery:
            for agent, token in zip(self.agents, tokens, strict=True):
                nursery.start_soon(join, agent, token)
            with trio.fail_after(120):
                for agent in self.agents:
                    await agent.fresh.wait()
            self.joined.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        for agent in self.agents:
            await agent.client.aclose()

    def errors(self) -> Counter[str]:
        return Counter(self.stats.errors)

    def renewals(self) -> int:
        return self.stats.renewals + self.stats.signed

    def held_until(self) -> datetime:
        """When the first of the fleet's agent SVIDs runs out."""
        return min(a.identity[0][0].not_valid_after_utc for a in self.agents if a.identity)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass  # it ended already (the failure is in `failed`)
        self._thread.join(30)
