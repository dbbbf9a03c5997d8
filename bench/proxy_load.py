"""Load for the proxy benchmark: wrk runs and a crowd of idle keep-alive connections.

Rules / theory of operation: the load generator is wrk (C, epoll), one
thread, so on a two-core machine it takes as little CPU from the proxies as
a generator can.  wrk prints its own summary in a human format; a small Lua
``done`` hook prints the same numbers as one JSON line, which is what we
parse.  Errors (connect, read, write, timeouts, non-2xx) are counted and
shown next to the rates, so a proxy that fails fast cannot look fast.  The
CPU each proxy process spent during a run is read from /proc before and
after, which on a shared two-core box is the figure least disturbed by the
other processes.  The idle crowd sends one request on each connection and
reads its answer before going quiet, so every connection has really crossed
both proxies (handshake done, backend connection open) when memory is read.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.proxy_stack import SetupError, cpu_times, host_busy_seconds

WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "bytes": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, '
    .. '"errors": %d}\\n',
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""
WRK_TIMEOUT = "10s"


@dataclass(frozen=True)
class Run:
    """One wrk run through one contender."""

    requests: int
    bytes: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    proxy_user_s: float
    proxy_sys_s: float
    """CPU time of the contender's proxy processes (all threads) during the run."""
    other_cores: float
    """Cores kept busy by everything except wrk, nginx and the proxies (other tenants)."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    def per_request_us(self, seconds: float) -> float:
        return seconds * 1e6 / self.requests if self.requests else float("nan")


def write_script(work: Path) -> Path:
    path = work / "report.lua"
    path.write_text(WRK_REPORT)
    return path


def run_wrk(
    wrk: str,
    script: Path,
    port: int,
    *,
    path: str,
    connections: int,
    seconds: int,
    close: bool,
    pids: Sequence[int],
    backend_pid: int,
) -> Run:
    """One wrk run; ``close`` sends ``Connection: close`` so every request is a new connection.

    CPU is read around it: the proxies' own (user and system apart), and what
    the machine did besides wrk, nginx and the proxies, which on a shared host
    says how much of the two cores the contenders really had.
    """
    argv = [
        wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", WRK_TIMEOUT,
        "-s", str(script),
    ]  # fmt: skip
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    ours = [*pids, backend_pid]
    before = [cpu_times(pid) for pid in ours]
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, t0 = host_busy_seconds(), time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    busy, elapsed = host_busy_seconds() - busy_before, time.monotonic() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = [cpu_times(pid) for pid in ours]
    user = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    system = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    wrk_cpu = kids.ru_utime + kids.ru_stime - kids_before.ru_utime - kids_before.ru_stime
    report = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not report:
        raise SetupError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    data = json.loads(report[-1])
    return Run(
        requests=int(data["requests"]),
        bytes=int(data["bytes"]),
        seconds=int(data["duration_us"]) / 1e6,
        p50_ms=float(data["p50_us"]) / 1e3,
        p99_ms=float(data["p99_us"]) / 1e3,
        errors=int(data["errors"]),
        proxy_user_s=sum(user[:-1]),
        proxy_sys_s=sum(system[:-1]),
        other_cores=max(0.0, (busy - sum(user) - sum(system) - wrk_cpu) / elapsed),
    )


def _read_response(sock: socket.socket) -> None:
    """Read one HTTP/1.1 response with a Content-Length body (all nginx sends here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise SetupError("connection closed before the response headers")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SetupError(f"unexpected response: {head.splitlines()[0]!r}")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise SetupError("connection closed in the middle of the body")
        body += chunk


def open_idle(port: int, count: int, path: str) -> list[socket.socket]:
    """``count`` keep-alive connections, each having carried one request, now idle.

    The caller closes them; on an error the ones opened so far are closed here.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            opened.append(sock)
            sock.sendall(request)
            _read_response(sock)
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        sock.close()
