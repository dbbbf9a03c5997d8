"""Workload API latency, throughput and rotation push delay through a real node agent.

Rules / theory of operation: everything measured crosses real process
boundaries, because that is where a workload pays.  A real `tally ca run` and a
real `tally agent run` are child processes; this process is the workload
(attested by its uid) and the load generator, so the clients' own Python cost
(HTTP/2, protobuf, certificate and key parsing) is inside every number, and
the tables say so.  py-spiffe runs in a child of its own because its protobuf
module clashes with Tally's in one process (spiffe-spec.md 6.4, pitfall 1).
The machine is small and shared, so each figure is the median of several runs
with their min and max, and nothing here passes or fails on speed.  The entry
asks for a 1 h SVID while fetches are measured, so renewals do not land in the
middle of a run, and is switched to 6 s only for the rotation measurement.

    .venv/bin/python -m bench.agent [--quick] [--runs 5] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import trio

from bench.ca_daemon import TRUST_DOMAIN, ca_daemon
from bench.proxy_stack import rss_kib
from tally.app.launch import Daemon, run_cli
from tally.wire import http
from tally.wire.grpc import encode_message
from tally.wire.workload_client import (
    Status,
    WorkloadApiError,
    X509Context,
    fetch_x509,
    watch_x509,
)

AGENT_ID = f"spiffe://{TRUST_DOMAIN}/agent/bench"
WORKLOAD_ID = f"spiffe://{TRUST_DOMAIN}/w"
FETCH_TTL = "1h"
ROTATION_TTL = "6s"

# Runs in a child process: py-spiffe must not share a protobuf pool with Tally.
# argv: socket path, seconds per run, runs, "new" (a client per fetch) or "reuse".
PY_SPIFFE_LOOP = """
import json, sys, time
from spiffe import WorkloadApiClient

address, seconds, runs, mode = "unix://" + sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def fetch_new():
    with WorkloadApiClient(socket_path=address, default_timeout=10) as client:
        client.fetch_x509_svid()

with WorkloadApiClient(socket_path=address, default_timeout=10) as shared:
    fetch = fetch_new if mode == "new" else shared.fetch_x509_svid
    for _ in range(5):
        fetch()
    for _ in range(runs):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fetch()
            count += 1
        print(json.dumps(count / (time.perf_counter() - t0)), flush=True)
"""


@dataclass(frozen=True)
class Plan:
    runs: int
    fetches: int
    seconds: float
    clients: tuple[int, ...]
    rotations: int
    entries: int = 1000
    """Section 5: extra entries, so the agent holds that many more SVIDs (0: skip it)."""
    streams: int = 1000
    """Section 5: open FetchX509SVID streams when the workload's SVID rotates."""


@dataclass(frozen=True)
class Stack:
    agent: Daemon
    admin: str
    endpoint_socket: Path
    entry_id: str


@dataclass(frozen=True)
class Load:
    rate: float
    errors: int
    agent_cpu: float
    """Percent of one core over the run, as is ``client_cpu``."""
    client_cpu: float

    @property
    def agent_us_per_fetch(self) -> float:
        """The agent's CPU per fetch: robust on a shared machine, where rates are not."""
        return self.agent_cpu / 100 * 1e6 / self.rate if self.rate else float("nan")


def cli(admin: str, *args: str) -> Any:
    result = run_cli("ca", *args, "--admin-socket", admin, "--output", "json")
    if result.returncode != 0:
        raise RuntimeError(f"tally ca {' '.join(args[:2])} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a child, from /proc, to show which side is saturated."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_stack(work: Path, daemons: list[Daemon]) -> Stack:
    """CA, then agent, then an entry for this process's uid; appends each daemon to
    ``daemons`` before starting it so the caller stops it whatever happens."""
    ca, admin = ca_daemon(work)
    daemons.append(ca)
    listen = ca.start("ca.started")["listen"]
    token = cli(admin, "token", "create", "--spiffe-id", AGENT_ID)["token"]
    bundle = work / "bundle.pem"
    bundle.write_text(cli(admin, "bundle", "show")["bundle"])
    endpoint_socket = work / "agent.sock"
    agent = Daemon(
        "agent",
        [
            "agent",
            "run",
            "--trust-domain",
            TRUST_DOMAIN,
            "--server",
            listen,
            "--trust-bundle",
            str(bundle),
            "--join-token",
            token,
            "--data-dir",
            str(work / "agent"),
            "--socket",
            str(endpoint_socket),
            "--metrics",
            "127.0.0.1:0",
            # Section 5 holds 1,000 streams from this one uid.
            "--workload-max-connections",
            "4096",
            "--workload-max-connections-per-uid",
            "4096",
        ],
    )
    daemons.append(agent)
    agent.start("agent.started")
    entry = cli(
        admin,
        "entry",
        "create",
        "--spiffe-id",
        WORKLOAD_ID,
        "--parent-id",
        AGENT_ID,
        "--selector",
        f"unix:uid:{os.getuid()}",
        "--ttl",
        FETCH_TTL,
    )
    agent.wait_for("svid.issued")
    trio.run(wait_for_identity, endpoint_socket)
    return Stack(agent, admin, endpoint_socket, entry["id"])


async def wait_for_identity(endpoint_socket: Path) -> None:
    """The agent logs the SVID before it publishes it; poll briefly until a fetch succeeds."""
    with trio.fail_after(30):
        while True:
            try:
                ctx = await fetch_x509(endpoint_socket)
            except WorkloadApiError as exc:
                if exc.status is not Status.PERMISSION_DENIED:
                    raise
                await trio.sleep(0.05)
                continue
            if ctx.default_svid.spiffe_id != WORKLOAD_ID:
                raise RuntimeError(f"expected {WORKLOAD_ID}, got {ctx.default_svid.spiffe_id}")
            return


def percentile(samples: Sequence[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def row(cells: Sequence[object], widths: Sequence[int]) -> str:
    return " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))


def spread(values: Sequence[float], fmt: str) -> list[str]:
    return [format(v, fmt) for v in (statistics.median(values), min(values), max(values))]


# -- 1. first-response latency -------------------------------------------------------


async def first_response_latencies(endpoint_socket: Path, n: int) -> list[float]:
    await fetch_x509(endpoint_socket)  # warm
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fetch_x509(endpoint_socket)
        samples.append(time.perf_counter() - t0)
    return samples


def report_latency(stack: Stack, plan: Plan) -> None:
    p50s, p99s = [], []
    for _ in range(plan.runs):
        samples = trio.run(first_response_latencies, stack.endpoint_socket, plan.fetches)
        p50s.append(percentile(samples, 50) * 1000)
        p99s.append(percentile(samples, 99) * 1000)
    print(
        f"\n1. First response: fetch_x509 on a new connection, sequential, N={plan.fetches} a run"
        "\n   (client connect + HTTP/2 setup + parsing the certificates and key + close)"
    )
    widths = (5, 10, 8, 8, 5)
    print(row(("stat", "median ms", "min ms", "max ms", "runs"), widths))
    for name, values in (("p50", p50s), ("p99", p99s)):
        print(row((name, *spread(values, ".2f"), plan.runs), widths))


# -- 2. fetches per second -------------------------------------------------------------


async def fetch_load(endpoint_socket: Path, agent_pid: int, clients: int, seconds: float) -> Load:
    done = errors = 0

    async def client(deadline: float) -> None:
        nonlocal done, errors
        while trio.current_time() < deadline:
            try:
                await fetch_x509(endpoint_socket)
            except WorkloadApiError:
                errors += 1
            else:
                done += 1

    agent0, own0, t0 = cpu_seconds(agent_pid), time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client, trio.current_time() + seconds)
    elapsed = time.perf_counter() - t0
    agent_cpu = (cpu_seconds(agent_pid) - agent0) / elapsed * 100
    client_cpu = (time.process_time() - own0) / elapsed * 100
    return Load(done / elapsed, errors, agent_cpu, client_cpu)


def report_throughput(stack: Stack, plan: Plan) -> None:
    print(
        f"\n2. Fetches/s, Tally client: each client loops fetch_x509 on a new connection for "
        f"{plan.seconds:g} s\n   (all clients are trio tasks in ONE bench process, so the client's"
        " own Python cost is in the figure;\n   CPU% is of one core: 100% on the client side means"
        " the client, not the agent, is the limit;\n   agent us/fetch = the agent's CPU per"
        " fetch, and 1-core/s = the fetches one core of agent would serve at that cost)"
    )
    widths = (7, 10, 8, 8, 6, 9, 10, 14, 9, 4)
    header = (
        "clients", "median/s", "min/s", "max/s", "errors", "agent%", "client%",
        "agent us/fetch", "1-core/s", "runs",
    )  # fmt: skip
    print(row(header, widths))
    for clients in plan.clients:
        trio.run(first_response_latencies, stack.endpoint_socket, 3)  # warm
        loads = [
            trio.run(fetch_load, stack.endpoint_socket, stack.agent.pid, clients, plan.seconds)
            for _ in range(plan.runs)
        ]
        rates = [load.rate for load in loads]
        print(
            row(
                (
                    clients,
                    *spread(rates, ".0f"),
                    sum(load.errors for load in loads),
                    format(statistics.median(load.agent_cpu for load in loads), ".0f"),
                    format(statistics.median(load.client_cpu for load in loads), ".0f"),
                    format(
                        cost := statistics.median(load.agent_us_per_fetch for load in loads), ".0f"
                    ),
                    format(1e6 / cost, ".0f"),
                    plan.runs,
                ),
                widths,
            )
        )


# -- 3. py-spiffe ----------------------------------------------------------------------


def py_spiffe_rates(endpoint_socket: Path, plan: Plan, mode: str) -> list[float]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PY_SPIFFE_LOOP,
            str(endpoint_socket),
            str(plan.seconds),
            str(plan.runs),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=60 + plan.runs * plan.seconds * 2,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"py-spiffe loop ({mode}) failed: {result.stderr.strip()[-2000:]}")
    return [float(line) for line in result.stdout.split()]


def report_py_spiffe(stack: Stack, plan: Plan) -> None:
    print(
        f"\n3. Fetches/s, py-spiffe (grpcio) fetch_x509_svid, 1 client in its own process,"
        f" {plan.seconds:g} s a run\n   (client cost included, as above)"
    )
    widths = (28, 9, 8, 8, 4)
    print(row(("client", "median/s", "min/s", "max/s", "runs"), widths))
    for mode, label in (
        ("new", "new WorkloadApiClient each"),
        ("reuse", "one client, reused channel"),
    ):
        rates = py_spiffe_rates(stack.endpoint_socket, plan, mode)
        print(row((label, *spread(rates, ".0f"), len(rates)), widths))


# -- 4. rotation to client -------------------------------------------------------------


def serial_of(ctx: X509Context) -> str:
    return format(ctx.default_svid.leaf.serial_number, "x")


async def rotation_arrivals(
    endpoint_socket: Path, count: int, switch_ttl: Callable[[], None]
) -> list[tuple[str, float]]:
    """(serial, wall-clock arrival) of the next ``count`` timer-driven renewals on one stream.

    The re-mint that the TTL switch itself causes is skipped: it is triggered by an
    entry change, not by the renewal timer, and lands while the CLI process that made
    the change is still exiting and this loop is not yet listening."""
    arrivals: list[tuple[str, float]] = []
    with trio.fail_after(30 + count * 6):
        async with watch_x509(endpoint_socket) as updates:
            seen = {serial_of(await anext(updates))}
            await trio.to_thread.run_sync(switch_ttl)
            async for ctx in updates:
                arrived = time.time()
                serial = serial_of(ctx)
                if serial in seen:
                    continue
                seen.add(serial)
                arrivals.append((serial, arrived))
                if len(arrivals) == count + 1:
                    break
    return arrivals[1:]


def logged_rotations(agent: Daemon, serials: set[str]) -> dict[str, float]:
    """When the agent logged each rotation; its stderr is read on a thread, so wait briefly."""
    deadline = time.monotonic() + 10
    while True:
        logged = {
            str(e["new_serial"]): datetime.fromisoformat(e["ts"]).timestamp()
            for e in agent.events("svid.rotated")
            if e.get("kind") == "workload"
        }
        if serials <= logged.keys() or time.monotonic() > deadline:
            return logged
        time.sleep(0.05)


def report_rotation(stack: Stack, plan: Plan) -> None:
    def switch_ttl() -> None:
        cli(stack.admin, "entry", "update", stack.entry_id, "--ttl", ROTATION_TTL)

    arrivals = trio.run(rotation_arrivals, stack.endpoint_socket, plan.rotations, switch_ttl)
    logged = logged_rotations(stack.agent, {serial for serial, _ in arrivals})
    delays = [(at - logged[serial]) * 1000 for serial, at in arrivals if serial in logged]
    print(
        f"\n4. Rotation to client: entry TTL {ROTATION_TTL} (renewed at 38-48% of life), timer-driven"
        " renewals on one watch_x509 stream;\n   delay = arrival of the new serial (parsed) - agent's"
        " svid.rotated log ts (truncated to ms, so up to +1 ms)"
    )
    widths = (9, 8, 8, 8, 9)
    print(row(("rotations", "p50 ms", "min ms", "max ms", "unmatched"), widths))
    if not delays:
        print(row((0, "-", "-", "-", len(arrivals)), widths))
        return
    print(
        row(
            (
                len(delays),
                format(statistics.median(delays), ".1f"),
                format(min(delays), ".1f"),
                format(max(delays), ".1f"),
                len(arrivals) - len(delays),
            ),
            widths,
        )
    )


# -- 5. a node with many entries and many streams -------------------------------------

SCALE_ENTRY_UID = 1_900_000_000
"""Scale entries select uids from here up: no process has them, so the agent holds their
SVIDs (it is their parent) while no fetch of ours returns them."""


async def create_entries(admin: str, count: int) -> None:
    """``count`` entries through the admin API on one kept-alive connection (a CLI process
    per entry would take minutes)."""

    async def connect() -> trio.abc.Stream:
        return await trio.open_unix_socket(admin)

    client = http.HttpClient(connect)
    try:
        for i in range(count):
            body = {
                "spiffe_id": f"spiffe://{TRUST_DOMAIN}/scale/{i}",
                "parent_id": AGENT_ID,
                "selectors": [f"unix:uid:{SCALE_ENTRY_UID + i}"],
                "ttl": 3600,
            }
            resp = await client.request("POST", "/v1/entries", json_body=body, timeout=30)
            if resp.status != 201 and resp.status != 200:
                raise RuntimeError(f"creating entry {i}: {resp.status} {resp.body[:200]!r}")
    finally:
        await client.aclose()


def raw_watch_request() -> bytes:
    """The bytes a client sends to open one FetchX509SVID stream (preface, SETTINGS,
    HEADERS, DATA).  Identical for every fresh connection, so built once: the scale
    test's clients then cost the bench nothing per update but a read."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"workload.spiffe.io", b"true"),
        ],
    )
    conn.send_data(1, encode_message(b""), end_stream=True)
    return conn.data_to_send()


def drain_now(sock: trio.socket.SocketType) -> int:
    """Read what is there without waiting (trio's sockets do not block); the byte count."""
    got = 0
    while True:
        try:
            data = os.read(sock.fileno(), 1 << 16)
        except BlockingIOError:
            return got
        if not data:
            raise RuntimeError("the agent closed a watch stream")
        got += len(data)


@dataclass(frozen=True)
class Scale:
    entries: int
    svid_kib: float
    """Agent RSS growth per cached SVID (its entry included)."""
    streams: int
    stream_kib: float
    """Agent RSS growth per open FetchX509SVID stream (one connection each)."""
    push_ms: list[float]
    """For each stream, arrival of the rotated SVID's first bytes - the agent's log ts."""


async def open_streams(
    endpoint_socket: Path, count: int, agent_pid: int
) -> tuple[list[trio.socket.SocketType], float]:
    """``count`` raw watch streams, each past its first snapshot; the agent's RSS growth."""
    request = raw_watch_request()
    before = rss_kib(agent_pid)
    socks = []
    for _ in range(count):  # one at a time: a burst of connects overflows the backlog
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(endpoint_socket))
        await sock.send(request)
        socks.append(sock)
        await trio.lowlevel.wait_readable(sock)
    await trio.sleep(1.0)  # every first snapshot is out by now
    for sock in socks:
        if not drain_now(sock):
            raise RuntimeError("a watch stream got no first snapshot")
    await trio.sleep(1.0)
    return socks, (rss_kib(agent_pid) - before) / count


async def push_arrivals(
    socks: list[trio.socket.SocketType], switch: Callable[[], None]
) -> list[float]:
    """Wall-clock arrival of the next bytes on every stream after ``switch`` runs."""
    arrivals: list[float] = []

    async def wait_one(sock: trio.socket.SocketType) -> None:
        await trio.lowlevel.wait_readable(sock)
        arrivals.append(time.time())
        drain_now(sock)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for sock in socks:
                nursery.start_soon(wait_one, sock)
            await trio.to_thread.run_sync(switch)
    return arrivals


def measure_scale(stack: Stack, entries: int, streams: int) -> Scale:
    # Section 4 left the workload's SVID renewing every few seconds: back to 1 h, so the
    # only rotation while the streams are open is the one this section makes.
    rotations = len(stack.agent.events("svid.rotated"))
    cli(stack.admin, "entry", "update", stack.entry_id, "--ttl", FETCH_TTL)
    stack.agent.wait_for("svid.rotated", timeout=30, count=rotations + 1)
    time.sleep(1.0)
    before = rss_kib(stack.agent.pid)
    issued = len(stack.agent.events("svid.issued"))
    trio.run(create_entries, stack.admin, entries)
    stack.agent.wait_for("svid.issued", timeout=300, count=issued + entries)
    time.sleep(1.0)
    svid_kib = (rss_kib(stack.agent.pid) - before) / entries

    switched: list[float] = []

    async def streams_and_push() -> tuple[float, list[float]]:
        socks, per_stream = await open_streams(stack.endpoint_socket, streams, stack.agent.pid)
        try:

            def switch() -> None:
                switched.append(time.time())
                cli(stack.admin, "entry", "update", stack.entry_id, "--ttl", "50m")

            return per_stream, await push_arrivals(socks, switch)
        finally:
            for sock in socks:
                sock.close()

    stream_kib, arrivals = trio.run(streams_and_push)
    rotated = [
        ts
        for e in stack.agent.events("svid.rotated")
        if e.get("kind") == "workload" and e.get("spiffe_id") == WORKLOAD_ID
        if (ts := datetime.fromisoformat(e["ts"]).timestamp()) >= switched[0] - 0.001
    ]
    if not rotated:
        raise RuntimeError("the agent logged no rotation of the workload's SVID")
    push_ms = sorted((at - rotated[0]) * 1000 for at in arrivals)
    return Scale(entries, svid_kib, streams, stream_kib, push_ms)


def report_scale(stack: Stack, plan: Plan) -> None:
    if not plan.entries:
        return
    got = measure_scale(stack, plan.entries, plan.streams)
    print(
        f"\n5. A node with {got.entries} more entries (the agent holds an SVID for each) and"
        f" {got.streams} open FetchX509SVID streams\n   (one connection each, raw HTTP/2 from"
        " this process: nothing parsed, so the push delay is the agent's);\n   push = first"
        " bytes of the rotated SVID on a stream - the agent's svid.rotated log ts (ms, +1 ms)"
    )
    widths = (22, 10)
    print(row(("agent RSS per SVID", f"{got.svid_kib:.1f} KiB"), widths))
    print(row(("agent RSS per stream", f"{got.stream_kib:.1f} KiB"), widths))
    ms = got.push_ms
    print(
        row(
            (f"push to {len(ms)} streams", f"p50 {statistics.median(ms):.1f} ms"),
            widths,
        )
        + f"  p99 {percentile(ms, 99):.1f} ms  last {ms[-1]:.1f} ms  first {ms[0]:.1f} ms"
    )


# -- main ------------------------------------------------------------------------------


def parse_plan(argv: Sequence[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="about 40 s instead of about 3 min")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--fetches", type=int, help="sequential fetches per latency run")
    parser.add_argument("--seconds", type=float, help="length of one throughput run")
    parser.add_argument("--clients", help="comma-separated concurrency levels")
    parser.add_argument("--rotations", type=int)
    parser.add_argument(
        "--entries", type=int, help="scale: extra entries the agent holds SVIDs for (0: skip)"
    )
    parser.add_argument("--streams", type=int, help="scale: open FetchX509SVID streams")
    args = parser.parse_args(argv)
    base = (
        Plan(runs=3, fetches=100, seconds=1.5, clients=(1, 10, 100), rotations=4, entries=0)
        if args.quick
        else Plan(runs=5, fetches=300, seconds=4.0, clients=(1, 10, 100), rotations=10)
    )
    return Plan(
        runs=args.runs or base.runs,
        fetches=args.fetches or base.fetches,
        seconds=args.seconds or base.seconds,
        clients=tuple(int(c) for c in args.clients.split(",")) if args.clients else base.clients,
        rotations=args.rotations or base.rotations,
        entries=base.entries if args.entries is None else args.entries,
        streams=args.streams or base.streams,
    )


def main() -> None:
    plan = parse_plan()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # section 5's streams
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="tally-bench-agent-"))
    daemons: list[Daemon] = []
    started = time.monotonic()
    try:
        stack = start_stack(work, daemons)
        affinity = len(os.sched_getaffinity(0))
        print(
            f"Tally node agent Workload API bench: {os.cpu_count()} CPUs ({affinity} usable),"
            f" Python {platform.python_version()}, {platform.machine()}, load average"
            f" {' '.join(format(x, '.2f') for x in os.getloadavg())} at start;\nagent and CA are"
            f" child processes; median of {plan.runs} runs with min/max unless stated"
        )
        report_latency(stack, plan)
        report_throughput(stack, plan)
        report_py_spiffe(stack, plan)
        report_rotation(stack, plan)
        report_scale(stack, plan)
        print(f"\n(total {time.monotonic() - started:.0f} s)")
    except* KeyboardInterrupt:
        print("interrupted; stopping the agent and CA", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
