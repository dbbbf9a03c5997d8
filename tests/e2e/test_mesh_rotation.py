"""The rotation test: app -> client proxy -> server proxy -> backend, under load, while
SVIDs live seconds and the CA's signing key rotates.  Every request must succeed and
no connection may be reset, while both proxies change certificates many times."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from tests.e2e.conftest import CA, Agent
from tests.e2e.mesh import (
    BACKEND,
    FRONTEND,
    Backend,
    Load,
    Proxy,
    client_proxy,
    log_time,
    metric,
    register,
    server_proxy,
)

pytestmark = pytest.mark.drill

RUN_SECONDS = 32


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_rotation_under_load_drops_nothing(ca_factory, agent_factory, mode: str):
    ca: CA = ca_factory("--default-svid-ttl", "6s", "--intermediate-ttl", "40s")
    agent: Agent = agent_factory(ca)
    for sid in (FRONTEND, BACKEND):
        register(ca, sid, agent.spiffe_id)
    backend = Backend()
    # In TCP mode the proxy cannot tell where one request ends, so closing a connection
    # whose peer certificate expired (the zero-trust default) would cut requests that
    # outlive a 6-second SVID; there the test shows that rotation itself disturbs nothing.
    # In HTTP mode the default stays on: the proxy closes after the response in flight.
    extra = ["--http"] if mode == "http" else ["--allow-expired-peer-connections"]
    procs: list[Proxy] = []
    try:
        server = server_proxy(agent.socket, backend.address, *extra)
        procs.append(server)
        client = client_proxy(agent.socket, server.listen, *extra)
        procs.append(client)

        load = Load(*client.host_port, xfcc=FRONTEND if mode == "http" else None)
        load.start()
        try:
            time.sleep(RUN_SECONDS / 2)  # load runs for its duration; no event to await
            rotated_at = datetime.now(UTC)
            ca.cli("rotate")  # the signing key, mid-run, on top of the automatic rotation
            time.sleep(RUN_SECONDS / 2)
        finally:
            load.stop()
        results, errors = load.results, load.errors

        assert results["ok"] > 200, results
        assert results["reset"] == 0, (results, errors)
        assert results["failed"] == 0 and results["bad"] == 0, (results, errors)
        assert load.failures() == 0, (results, errors)
        # Both proxies put new certificates into service several times.
        for name, proxy in (("server", server), ("client", client)):
            rotated = proxy.daemon.events("svid.rotated")
            assert len(rotated) >= 4, (name, len(rotated))
            assert metric(proxy.metrics, "tally_proxy_rotations_total") >= 4
        # The signing key changed under them, and rotation went on across the change.
        after = [e for e in server.daemon.events("svid.rotated") if log_time(e) > rotated_at]
        assert len(after) >= 2, after
    finally:
        for proc in procs:
            proc.daemon.stop()
        backend.close()
