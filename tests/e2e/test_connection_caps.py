"""Connection caps on the two local sockets, against the real daemons.

A flood from one uid must leave another uid served on the Workload API, and
the admin socket over its cap must answer one clear line and then recover.
"""

from __future__ import annotations

import socket
import struct
import time
import urllib.request

import pytest

from tests.e2e.conftest import CA
from tests.e2e.test_agent import UID, probe, register, wait_fetch

_GOAWAY = 0x7
_ENHANCE_YOUR_CALM = 0xB
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frames_until_eof(sock: socket.socket, timeout: float = 10) -> list[tuple[int, bytes]]:
    """Every HTTP/2 frame the server sends before it closes, as (type, payload)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        frames.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


def first_frame_type(sock: socket.socket, timeout: float = 10) -> int:
    """The type of the first frame the server sends (SETTINGS, 0x4, when it serves us)."""
    sock.settimeout(timeout)
    head = b""
    while len(head) < 9:
        chunk = sock.recv(9 - len(head))
        assert chunk, "closed before the server's first frame"
        head += chunk
    return head[3]


def metrics_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_flood_from_one_uid_leaves_another_uid_served(ca: CA, agent_factory):
    if UID != 0:
        pytest.skip("needs root to run a client under another uid")
    agent = agent_factory(ca, "node-1", "--workload-max-connections-per-uid", "3")
    register(ca, agent, "root", "unix:uid:0")
    register(ca, agent, "nobody", "unix:uid:65534")
    wait_fetch(agent, "spiffe://example.org/root")
    held = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(agent.socket)
            sock.sendall(_PREFACE)
            assert first_frame_type(sock) == 0x4  # SETTINGS: served
            held.append(sock)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as over:
            over.connect(agent.socket)
            frames = frames_until_eof(over)
        goaway = [payload for kind, payload in frames if kind == _GOAWAY]
        assert goaway, frames
        code = struct.unpack(">I", goaway[0][4:8])[0]
        assert code == _ENHANCE_YOUR_CALM and b"too many connections" in goaway[0][8:]
        refused = agent.daemon.wait_for("workload.refused")
        assert refused["reason"] == "max_connections_per_uid" and refused["uid"] == 0
        # Another uid is served while root still holds its three.
        deadline = time.monotonic() + 10
        while True:
            out = probe("fetch", agent.socket, "--uid", "65534")[0]
            if "svids" in out:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.2)
        assert [s["spiffe_id"] for s in out["svids"]] == ["spiffe://example.org/nobody"]
        text = metrics_text(agent.metrics)
        assert 'tally_agent_workload_refused_total{reason="max_connections_per_uid"} 1.0' in text, (
            text
        )
    finally:
        for sock in held:
            sock.close()
    # Root's slots come back once its connections are gone.
    wait_fetch(agent, "spiffe://example.org/root")
    assert agent.daemon.proc is not None and agent.daemon.proc.poll() is None


def _held_admin_connection(path: str) -> socket.socket:
    """An admin connection that has had one answer and stays open (keep-alive)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(10)
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nhost: tally\r\n\r\n")
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return sock


def test_admin_socket_over_its_cap_refuses_cleanly_and_recovers(ca_factory):
    ca = ca_factory("--admin-max-connections", "2")
    held = [_held_admin_connection(ca.admin_socket) for _ in range(2)]
    try:
        busy = ca.cli("health", check=False)
        assert busy.returncode != 0
        assert "Traceback" not in busy.stderr
        lines = busy.stderr.strip().splitlines()
        assert len(lines) == 1 and "admin socket busy" in lines[0], busy.stderr
        assert ca.daemon.wait_for("admin.refused")["reason"] == "max_connections"
        text = metrics_text(ca.metrics)
        assert 'tally_ca_admin_refused_total{reason="max_connections"} 1.0' in text, text
    finally:
        held.pop().close()
    deadline = time.monotonic() + 10
    while (result := ca.cli("health", check=False)).returncode != 0:
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.1)
    for sock in held:
        sock.close()
