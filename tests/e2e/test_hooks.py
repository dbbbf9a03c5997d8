"""Remediation hooks end to end: a real CA and agents, a webhook receiver, a hook that hangs.

The receiver is a small HTTP server in this process: the one fake, at the one
boundary that is not Tally (the operator's pager).
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.e2e.conftest import CA, ENGINES, Agent, make_ca, new_datastore, start_agent
from tests.e2e.mesh import register

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=ENGINES)
def ca_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


TTL = 4  # seconds: renewals every ~1.5-1.9 s, an expiry 4 s after renewals stop
WORKLOAD = "spiffe://example.org/hooked"
SLOW = "spiffe://example.org/slow"


class Receiver:
    """Collects POSTed hook payloads with the time each arrived."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.arrived:
                    receiver.got.append((time.monotonic(), json.loads(body)))
                    receiver.arrived.notify_all()
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/page"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, event: str, after: float = 0.0, timeout: float = 15) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for at, doc in self.got:
                    if doc["event"] == event and at >= after:
                        return at, doc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {event} hook arrived; got {self.got}")
                self.arrived.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory, receiver, ca_engine: str, request: pytest.FixtureRequest
) -> Iterator[tuple[CA, Agent, Agent, Path]]:
    """A CA with 4 s SVIDs; node-1 pages the receiver, node-2 runs a hook that never returns."""
    base = tmp_path_factory.mktemp("hooks")
    # The CA's own hook: a command that appends each event it gets to a file.
    append = f"import sys; open({str(base / 'ca-hook.jsonl')!r}, 'a').write(sys.stdin.read())"
    ca_hook = {"on": ["audit.broken"], "command": [sys.executable, "-c", append]}
    ca = make_ca(
        base,
        "--default-svid-ttl",
        f"{TTL}s",
        "--audit-verify-every",
        "1s",
        "--hook",
        _inline(json.dumps(ca_hook)),
        datastore=new_datastore(ca_engine, request)(),
    )
    # No coalescing: on a loaded machine the CA's restart in one test can outlast a 4 s
    # SVID, and the eviction test must still see its own svid.expired, not a repeat held back.
    paging = json.dumps(
        {
            "on": ["rotation.failed", "svid.expired", "agent.evicted"],
            "url": receiver.url,
            "coalesce": 0,
        }
    )
    hanging = json.dumps(
        {
            "on": ["svid.issued", "svid.rotated", "rotation.failed"],
            "command": ["sleep", "1000"],
            "timeout": 60,
            "queue": 2,
        }
    )
    # JSON objects are not TOML inline tables; the flag takes TOML: key = value.
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(start_agent, ca, base, "node-1", "--hook", _inline(paging))
        two = pool.submit(start_agent, ca, base, "node-2", "--hook", _inline(hanging))
        node1, node2 = one.result(), two.result()
    register(ca, WORKLOAD, node1.spiffe_id)
    register(ca, SLOW, node2.spiffe_id)
    node1.daemon.wait_for("svid.issued", timeout=15)
    node2.daemon.wait_for("svid.issued", timeout=15)
    yield ca, node1, node2, base
    for daemon in (node1.daemon, node2.daemon, ca.daemon):
        daemon.stop()


def _inline(doc: str) -> str:
    """A JSON object of strings and lists as a TOML inline table."""
    fields = json.loads(doc)
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in fields.items()) + "}"


def scrape(agent: Agent) -> str:
    with urlopen(f"http://{agent.metrics}/metrics", timeout=5) as resp:
        return resp.read().decode()


def wait_scraped(agent: Agent, sample: str) -> str:
    """The agent's metrics once they show ``sample`` (a page reaches the receiver before
    the agent has its answer and counts it), or as they are after 5 s."""
    deadline = time.monotonic() + 5
    while sample not in (page := scrape(agent)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return page


def _rotations(agent: Agent, spiffe_id: str) -> list[datetime]:
    lines = [
        line
        for line in agent.daemon.events("svid.issued") + agent.daemon.events("svid.rotated")
        if line.get("spiffe_id") == spiffe_id
    ]
    return sorted(datetime.fromisoformat(line["ts"].replace("Z", "+00:00")) for line in lines)


def test_a_hook_that_never_returns_leaves_rotation_on_schedule(fleet):
    _, _, node2, _ = fleet
    node2.daemon.wait_for("svid.rotated", timeout=3 * TTL, count=2)
    times = _rotations(node2, SLOW)
    assert len(times) >= 3, times
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    # Renewal is due between 38 % and 48 % of the lifetime after the last issue, plus the
    # round trip to the CA (up to a second on a loaded machine), always before the 75 %
    # mark where the agent would call the SVID at risk: a hook stuck on every rotation,
    # with its queue full, moves none of them.
    assert all(gap <= 0.48 * TTL + 1.0 for gap in gaps), gaps
    assert not node2.daemon.events("hook.failed")  # still running: its 60 s have not passed
    # Its metrics say so: events queued behind the stuck one, none delivered.
    stuck = wait_scraped(node2, 'tally_agent_hook_events_total{outcome="queued"}')
    assert 'tally_agent_hook_events_total{outcome="queued"}' in stuck
    assert 'outcome="delivered"' not in stuck


def test_rotation_failed_reaches_the_webhook_within_a_second_of_the_ca_going_away(fleet, receiver):
    ca, node1, _, _ = fleet
    gone = time.monotonic()
    ca.daemon.kill()
    at, doc = receiver.wait("rotation.failed", after=gone, timeout=10)
    assert at - gone < 1.0, at - gone
    assert doc["daemon"] == "agent" and doc["identity"] == node1.spiffe_id
    assert doc["reason"] and "CA" in doc["action"]
    assert "token" not in json.dumps(doc).lower()
    ca.start_again()
    node1.daemon.wait_for("svid.rotated", timeout=15, count=len(_rotations(node1, WORKLOAD)))


def test_svid_expired_reaches_the_webhook_on_eviction(fleet, receiver):
    ca, node1, _, _ = fleet
    evicted = time.monotonic()
    ca.cli("agent", "evict", node1.spiffe_id)
    _, doc = receiver.wait("agent.evicted", after=evicted, timeout=15)
    assert doc["identity"] == node1.spiffe_id
    _, doc = receiver.wait("svid.expired", after=evicted, timeout=TTL + 10)
    assert doc["identity"] == WORKLOAD and doc["daemon"] == "agent"
    assert "expired" in doc["action"]
    # The agent counts what it delivered.
    delivered = 'tally_agent_hook_events_total{outcome="delivered"}'
    assert delivered in wait_scraped(node1, delivered)


def test_the_ca_finds_its_broken_audit_chain_and_runs_its_hook(fleet):
    """Last: it breaks the CA's datastore on purpose."""
    ca, _, _, base = fleet
    assert not ca.daemon.events("audit.broken")  # a second of checks found nothing so far
    ca.sql("UPDATE audit SET actor = 'someone-else' WHERE seq = 2")
    line = ca.daemon.wait_for("audit.broken", timeout=5)
    assert line["bad_seq"] == 2 and "altered" in line["problem"]
    out = base / "ca-hook.jsonl"
    deadline = time.monotonic() + 5
    # the hook appends one JSON line; wait for the whole line, not just the file
    while not (out.exists() and out.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    doc = json.loads(out.read_text().splitlines()[0])
    assert doc["daemon"] == "ca" and doc["event"] == "audit.broken"
    assert doc["identity"] == "spiffe://example.org/tally/ca"
    assert "tally ca audit verify" in doc["action"]
