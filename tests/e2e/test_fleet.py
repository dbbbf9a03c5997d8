"""A real CA with simulated agents parked on it: a change costs only whom it concerns.

Each simulated agent has its own join token, key and agent SVID and talks to the
CA process over mutual TLS with the agent's own client (`agent.ca_client`); the
counts come from the CA's ``/metrics``.  On both datastore engines: on PostgreSQL a
server's own changes must still wake only the poll they concern.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import trio

from agent.ca_client import CAClient
from tally.ops.config import Address
from tally.spiffe import pem, x509profile
from tally.spiffe.spiffeid import TrustDomain
from tally.wire import http
from tests.e2e.conftest import CA, ENGINES

N = 200


@pytest.fixture(scope="module", params=ENGINES)
def ca_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _admin(ca: CA, method: str, target: str, body: object = None) -> Any:
    async def connect() -> trio.abc.Stream:
        return await trio.open_unix_socket(ca.admin_socket)

    client = http.HttpClient(connect)
    try:
        resp = await client.request(method, target, json_body=body, timeout=30)
    finally:
        await client.aclose()
    assert resp.status < 300, resp.body
    return resp.json()


async def _metrics(ca: CA) -> dict[str, float]:
    host, port = ca.metrics.rsplit(":", 1)

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, int(port))

    client = http.HttpClient(connect)
    try:
        resp = await client.request("GET", "/metrics", timeout=30)
    finally:
        await client.aclose()
    out = {"tally_ca_poll_wakeups_total": 0.0}
    for line in resp.body.decode().splitlines():
        if line.startswith("tally_ca_poll") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
            base = name.split("{", 1)[0]
            if base != name:  # labelled samples also count toward their total
                out[base] = out.get(base, 0.0) + float(value)
    return out


async def _parked(ca: CA, count: int) -> dict[str, float]:
    """The metrics once ``count`` polls are parked (bounded: 60 s)."""
    with trio.fail_after(60):
        while True:
            seen = await _metrics(ca)
            if seen.get("tally_ca_polls_parked") == count:
                return seen
            await trio.sleep(0.05)


async def _attested(ca: CA, n: int) -> tuple[list[CAClient], list[str]]:
    """``n`` agents, each attested with its own join token and key: clients and IDs."""
    td = TrustDomain.parse(ca.trust_domain)
    bundle = await _admin(ca, "GET", "/v1/bundle")
    roots = pem.chain_from_pem(str(bundle["bundle"]).encode())
    address = Address.parse(ca.listen)
    clients: list[CAClient] = []
    ids: list[str] = []
    for _ in range(n):
        made = await _admin(ca, "POST", "/v1/tokens", {})
        client = CAClient(address, td, roots, timeout=30)
        key = x509profile.generate_key()
        issued, _, _ = await client.attest(str(made["token"]), key)
        client.set_identity(issued.chain, key)
        clients.append(client)
        ids.append(issued.spiffe_id)
    return clients, ids


async def test_one_renewal_and_one_entry_change_wake_one_agent_of_200(ca: CA) -> None:
    clients, ids = await _attested(ca, N)
    first = await clients[0].entries_sync()
    assert first.full and first.entries == ()
    revision = first.revision
    answers: dict[int, Any] = {}
    answered = {i: trio.Event() for i in range(N)}

    async def poll(i: int) -> None:
        answers[i] = await clients[i].entries_sync(since=revision, wait=50)
        answered[i].set()

    try:
        async with trio.open_nursery() as nursery:
            for i in range(N):
                nursery.start_soon(poll, i)
            before = await _parked(ca, N)

            # One agent renews: its own poll wakes; nobody else's is checked.
            await clients[0].renew(x509profile.generate_key())
            after = await _parked(ca, N - 1)
            assert after['tally_ca_poll_wakeups_total{cause="renewal"}'] == 1
            assert after["tally_ca_poll_wakeups_total"] - before["tally_ca_poll_wakeups_total"] == 1
            assert after["tally_ca_poll_checks_total"] - before["tally_ca_poll_checks_total"] == 1
            with trio.fail_after(10):
                await answered[0].wait()
            assert list(answers) == [0]

            # One entry for agent 5: agent 5 alone wakes, and is sent that one entry.
            entry = await _admin(
                ca,
                "POST",
                "/v1/entries",
                {"spiffe_id": "spiffe://example.org/web", "parent_id": ids[5],
                 "selectors": ["unix:uid:1000"]},
            )  # fmt: skip
            later = await _parked(ca, N - 2)
            assert later['tally_ca_poll_wakeups_total{cause="entry"}'] == 1
            assert later["tally_ca_poll_wakeups_total"] - after["tally_ca_poll_wakeups_total"] == 1
            assert later["tally_ca_poll_checks_total"] - after["tally_ca_poll_checks_total"] == 1
            with trio.fail_after(10):
                await answered[5].wait()
            assert sorted(answers) == [0, 5]
            delta = answers[5]
            assert not delta.full and [e["id"] for e in delta.entries] == [entry["id"]]
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            await client.aclose()


def _ca_sockets(ca: CA) -> int:
    """Sockets the CA process holds open now (listeners and connections)."""
    fds = f"/proc/{ca.daemon.pid}/fd"
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(f"{fds}/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass  # closed while we looked
    return count


async def test_a_root_rotation_ends_each_agents_one_poll_with_the_bundle_then_idle_closes(
    ca: CA,
) -> None:
    n = 20
    sequence = int((await _admin(ca, "GET", "/v1/bundle"))["bundle_sequence"])
    clients, _ = await _attested(ca, n)
    # Holding the current sequence, a sync carries no bundle; an older one gets it at once.
    first = await clients[0].entries_sync(bundle=sequence)
    assert first.bundle is None
    told = await clients[0].entries_sync(since=first.revision, wait=50, bundle=sequence - 1)
    assert told.bundle is not None and told.bundle.sequence == sequence
    answers: dict[int, Any] = {}
    returned: list[float] = []

    async def poll(i: int) -> None:
        answers[i] = await clients[i].entries_sync(since=first.revision, wait=50, bundle=sequence)
        returned.append(time.monotonic())  # its connection went back to the pool just now

    try:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(poll, i)
            before = await _parked(ca, n)  # one parked request per agent, nothing else
            await _admin(ca, "POST", "/v1/rotate", {"root": True})
            after = await _parked(ca, 0)
        woken = 'tally_ca_poll_wakeups_total{cause="bundle"}'
        assert after[woken] - before.get(woken, 0.0) == n  # each once
        assert after["tally_ca_poll_checks_total"] - before["tally_ca_poll_checks_total"] == n
        rotated = await _admin(ca, "GET", "/v1/bundle")
        for i in range(n):
            news = answers[i].bundle
            assert news is not None and news.sequence == rotated["bundle_sequence"] > sequence
            assert news.roots_pem.decode() == rotated["bundle"]

        # The polls' connections are now idle in each pool; close_idle closes them, and
        # the CA sees them go.
        assert [c.pooled for c in clients] == [1] * n
        busy = _ca_sockets(ca)
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.close_idle, 1.0)
            with trio.fail_after(20):
                while True:  # the CA's descriptors are not something one can wait on
                    if not any(c.pooled for c in clients) and _ca_sockets(ca) <= busy - n:
                        break
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        # Not before they were idle that long (counted from when each came back to its
        # pool, a moment before its poll returned: hence the margin).
        assert time.monotonic() - max(returned) >= 0.9
    finally:
        for client in clients:
            await client.aclose()
