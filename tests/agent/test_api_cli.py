"""`tally agent api ...` names a missing or bad endpoint socket in one line, never a traceback."""

from __future__ import annotations

import os

from tally.app.launch import run_cli


def test_no_endpoint_socket_is_one_line(monkeypatch):
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    assert "SPIFFE_ENDPOINT_SOCKET" not in os.environ
    result = run_cli("agent", "api", "fetch")
    assert result.returncode == 1
    assert result.stderr.startswith("tally: error: SPIFFE_ENDPOINT_SOCKET is not set")
    assert result.stderr.strip().endswith("(or give --socket)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_tcp_endpoint_is_one_line():
    result = run_cli("agent", "api", "fetch", "--socket", "tcp://127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("tally: error: --socket: ")
    assert len(result.stderr.strip().splitlines()) == 1
