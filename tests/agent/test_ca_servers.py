"""Which CA server an agent calls (`agent.ca_client.CAServers`): spread at start, the next
one on failure, a jittered doubling rest for the failed one, on trio's virtual clock;
and when a refused call is sent again (`agent.ca_client` rule 6)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agent.ca_client import REST_CAP, CAClient, CAError, CAServers
from tally.ops.config import Address
from tally.spiffe.spiffeid import TrustDomain

THREE = [Address.parse(f"10.0.0.{i}:8443") for i in (1, 2, 3)]


def test_a_fleet_spreads_over_the_servers():
    starts = [
        CAServers(THREE, random.Random(seed), clock=lambda: 0.0).pick() for seed in range(300)
    ]
    assert {starts.count(i) for i in range(3)} <= set(range(70, 131))


async def test_a_failed_server_rests_for_a_jittered_doubling_while(
    autojump_clock: trio.testing.MockClock,
):
    servers = CAServers(THREE, random.Random(7))
    first = servers.pick()
    rests = []
    for _ in range(8):
        rests.append(servers.failed(first))
        assert servers.pick() != first
    for n, rest in enumerate(rests):
        base = min(REST_CAP, 2.0**n)
        assert 0.5 * base <= rest <= 1.5 * base
    await trio.sleep(rests[-1] + 0.01)  # virtual time: the rest is over
    assert not servers.resting(first)
    servers.succeeded(first)
    assert servers.failed(first) <= 1.5  # a success starts the doubling over


async def test_when_all_rest_the_one_whose_rest_ends_first_is_tried(autojump_clock):
    servers = CAServers(THREE[:2], random.Random(1))
    for _ in range(3):
        servers.failed(0)
    servers.failed(1)
    assert servers.pick() == 1
    await trio.sleep(45)
    assert servers.pick() == 1 and not servers.resting(0)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.floats(0, 40)), max_size=40))
def test_a_resting_server_is_never_picked_while_another_is_up(steps):
    now = [0.0]
    servers = CAServers(THREE, random.Random(0), clock=lambda: now[0])
    for fail, i, later in steps:
        servers.failed(i) if fail else servers.succeeded(i)
        now[0] += later
        picked = servers.pick()
        up = [j for j in range(3) if not servers.resting(j)]
        assert picked in up or not up


def test_a_name_with_several_addresses_counts_as_several_servers():
    import socket

    from agent.settings import expand_servers

    def resolve(host, port, type):  # what the system resolver answers for round-robin DNS
        ips = {"ca.internal": ["10.0.0.1", "10.0.0.2", "10.0.0.1"], "v6.internal": ["fd00::1"]}
        return [(socket.AF_INET, type, 6, "", (ip, port)) for ip in ips.get(host, [])]

    got = expand_servers(
        [Address.parse("ca.internal:8443"), Address.parse("v6.internal:9443")], resolve
    )
    assert got == [
        Address.parse("10.0.0.1:8443"),
        Address.parse("10.0.0.2:8443"),
        Address.parse("v6.internal:9443"),  # one address: the name stays, resolved per connect
    ]
    unresolved = [Address.parse("no-such-host.invalid:8443")]
    assert expand_servers(unresolved, resolve) == unresolved
    assert expand_servers([Address.parse("127.0.0.1:8443")]) == [Address.parse("127.0.0.1:8443")]


def test_server_in_the_file_is_one_string_or_a_list(tmp_path):
    """`server = "ca:8443"` (a file from before several servers) still reads, as one server."""
    import argparse

    from agent.settings import AgentSettings
    from tally.ops.config import ConfigError, add_arguments, load

    def servers(line: str) -> list[str]:
        path = tmp_path / "agent.toml"
        path.write_text(f'trust_domain = "example.org"\n{line}\n')
        parser = argparse.ArgumentParser()
        add_arguments(parser, AgentSettings)
        return load(AgentSettings, parser.parse_args(["--config", str(path)]), env={}).server

    assert servers('server = "ca-1:8443"') == ["ca-1:8443"]
    assert servers('server = ["ca-1:8443", "ca-2:8443"]') == ["ca-1:8443", "ca-2:8443"]
    for line, why in (
        ("server = []", "needs at least one HOST:PORT"),
        ('server = "ca-1"', "HOST:PORT"),
        ("server = 8443", "expected a string or an array of strings, got integer 8443"),
    ):
        try:
            servers(line)
        except ConfigError as exc:
            assert why in str(exc), (line, str(exc))
        else:
            raise AssertionError(f"{line} was accepted")


class _Answers(CAClient):
    """The CA's answers to a `CAClient`, scripted: ``renew_meanwhile`` replaces the
    agent's identity while the first call is out, as a renewal does while a poll is
    parked; the transport and TLS are not what this is about."""

    def __init__(
        self,
        answers: list[object],
        *,
        renew_meanwhile: bool = False,
        servers: CAServers | None = None,
    ) -> None:
        super().__init__(servers or THREE[0], TrustDomain.parse("example.org"), [])
        self.answers = answers
        self.renew_meanwhile = renew_meanwhile
        self.sent: list[int] = []
        """The identity generation each call went out under."""
        self.called: list[int] = []
        """The server each call went to."""

    async def _call_one(
        self, i: int, method: str, target: str, body: object | None = None, *, wait: float = 0
    ) -> Any:
        self.sent.append(self._generation)
        self.called.append(i)
        if self.renew_meanwhile and len(self.sent) == 1:
            self._new_generation()
        answer = self.answers.pop(0)
        if isinstance(answer, CAError):
            raise answer
        return answer


def _stale() -> CAError:
    return CAError("stale_svid", "the CA knows a newer SVID for this agent", 403)


async def test_a_call_refused_as_stale_after_a_renewal_meanwhile_is_sent_again_once():
    client = _Answers([_stale(), {"revision": 7}], renew_meanwhile=True)
    assert await client._call("GET", "/v1/entries") == {"revision": 7}
    assert client.sent == [0, 1]  # the second under the new identity
    twice = _Answers([_stale(), _stale(), {}], renew_meanwhile=True)
    with pytest.raises(CAError, match="newer SVID"):
        await twice._call("GET", "/v1/entries")
    assert twice.sent == [0, 1]


async def test_stale_under_the_current_identity_stands():
    """A restored backup or a copied data dir: the SVID it presents is really stale."""
    client = _Answers([_stale(), {}], renew_meanwhile=False)
    with pytest.raises(CAError, match="newer SVID"):
        await client._call("GET", "/v1/entries")
    assert client.sent == [0]


async def test_a_failed_call_goes_to_the_other_server_even_while_it_rests():
    """A rolling restart: B came back a moment ago and still rests from its failures
    when A goes down; the call goes to B rather than failing without asking it."""
    servers = CAServers(THREE[:2], random.Random(3))
    servers.current = 0
    for _ in range(5):
        servers.failed(1)  # B rests for up to 30 s
    down = CAError("unreachable", "CA at A unreachable: connection refused")
    client = _Answers([down, {"revision": 1}], servers=servers)
    assert await client._call("GET", "/v1/entries") == {"revision": 1}
    assert client.called == [0, 1]
    both_down = _Answers([down, down, {}], servers=servers)
    with pytest.raises(CAError, match="unreachable"):
        await both_down._call("GET", "/v1/entries")
    assert sorted(both_down.called) == [0, 1]  # each server once, then it gives up


@given(st.sets(st.integers(0, 2)), st.lists(st.integers(0, 2), max_size=6))
def test_pick_prefers_an_untried_server_whatever_rests(tried, failures):
    servers = CAServers(THREE, random.Random(0), clock=lambda: 0.0)
    for i in failures:
        servers.failed(i)
    picked = servers.pick(tried)
    if len(tried) < 3:
        assert picked not in tried
        if any(not servers.resting(i) for i in range(3) if i not in tried):
            assert not servers.resting(picked)
