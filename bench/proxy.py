"""The mesh path through Tally, stunnel and HAProxy, side by side, on this machine.

Rules / theory of operation: the path is the one a mesh pays for, load
generator -> outbound (client) proxy -> inbound (server) proxy -> backend,
all on 127.0.0.1, with the same EC P-256 SVIDs (minted by a real Tally CA)
and TLS 1.3 for every contender.  wrk is the load generator and nginx the
backend, both C, so the proxies are what is measured; a "direct" row shows
what wrk and nginx do with no proxy at all.  Tally runs in TCP mode, like
stunnel and HAProxy in mode tcp, and again in HTTP mode, where its outbound
pool lets a new local connection reuse a kept-alive mTLS connection.  HTTP
mode's like-for-like contender is HAProxy in mode http (``haproxy http``):
it parses every request and response, and its inbound sets a client
certificate header as Tally's sets X-Forwarded-Client-Cert.

The machine has two cores shared by wrk, nginx and both proxy processes.
Nothing is pinned: with five busy processes on two cores no pinning is
neutral, and pinning a one-thread Python proxy would deny it the spare
cycles that stunnel's and HAProxy's threads are free to use.  Every
contender faces the same contention; the CPU column (proxy CPU time per
request, both proxies together) is the figure least bent by it.  Runs are
interleaved (round after round over every workload and contender) so a
slow minute on a shared host hurts everyone alike, and medians are printed
with the spread of requests/s across runs.  Memory per idle connection is
measured on fresh proxy pairs: RSS of both processes (VmRSS) before and
after 1,000 keep-alive connections that each carried one request.

    .venv/bin/python -m bench.proxy [--quick] [--runs 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shutil
import signal
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.request import urlopen

from bench.proxy_load import Run, close_all, open_idle, run_wrk, write_script
from bench.proxy_stack import (
    CIPHERSUITES,
    SMALL_BODY,
    Backend,
    Binaries,
    Credentials,
    Pair,
    ensure_packages,
    mint_credentials,
    rss_kib,
    start_haproxy,
    start_nginx,
    start_stunnel,
    start_tally,
    versions,
)

SETTLE_S = 1.0
"""Pause after the idle crowd is open, so the proxies finish their bookkeeping before RSS."""


@dataclass(frozen=True)
class Plan:
    runs: int
    seconds: int
    warmup_s: int
    idle: int


@dataclass(frozen=True)
class Workload:
    number: int
    title: str
    path: str
    connections: int
    close: bool


WORKLOADS = (
    Workload(1, f"keep-alive, {SMALL_BODY} B responses", "/small", 16, close=False),
    Workload(2, "keep-alive, 1 MiB responses", "/big", 4, close=False),
    Workload(3, f"new connection per request, {SMALL_BODY} B", "/small", 16, close=True),
)
REFERENCES = ("stunnel", "haproxy", "haproxy http")


@dataclass(frozen=True)
class Memory:
    name: str
    before_kib: tuple[int, ...]
    after_kib: tuple[int, ...]
    connections: int

    def per_connection(self, side: int) -> float:
        return (self.after_kib[side] - self.before_kib[side]) / self.connections

    @property
    def total_per_connection(self) -> float:
        return sum(self.per_connection(i) for i in range(len(self.before_kib)))


Starter = Callable[[contextlib.ExitStack], Pair]


@dataclass(frozen=True)
class Contender:
    start: Starter
    memory: bool
    """Whether to measure idle memory (not in HTTP mode: idle local connections hold no mTLS)."""


def raise_fd_limit() -> int:
    """Children inherit it: 1,000 idle connections are 2,000+ descriptors per proxy."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def contenders(
    bins: Binaries, creds: Credentials, work: Path, backend: int, workers: int
) -> list[Contender]:
    many = [
        # Every core: each proxy as ``workers`` processes (``--workers``).  On a 2-core box
        # shared with wrk and nginx the rate cannot double; the CPU column shows the cost.
        Contender(
            partial(start_tally, creds=creds, backend=backend, http=http, workers=workers),
            memory=False,
        )
        for http in (False, True)
        if workers > 1
    ]
    return [
        Contender(lambda s: start_tally(s, creds, backend, http=False), memory=True),
        # Key exchange as stunnel and HAProxy do it (OpenSSL 3.0 has no post-quantum
        # hybrid): only new connections pay for key exchange.
        Contender(
            lambda s: start_tally(s, creds, backend, http=False, groups="X25519", workloads=(3,)),
            memory=False,
        ),
        Contender(lambda s: start_tally(s, creds, backend, http=True), memory=False),
        Contender(lambda s: start_stunnel(s, bins, creds, work, backend), memory=True),
        Contender(lambda s: start_haproxy(s, bins, creds, work, backend), memory=True),
        # HTTP mode's like-for-like: HAProxy parsing HTTP and adding a client-cert header.
        Contender(lambda s: start_haproxy(s, bins, creds, work, backend, http=True), memory=False),
        *many,
    ]


def handshakes(pair: Pair) -> dict[str, float]:
    """Tally inbound handshake counters by outcome, from its /metrics."""
    if pair.inbound_metrics is None:
        return {}
    with urlopen(f"http://{pair.inbound_metrics}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if line.startswith("tally_proxy_handshakes_total{"):  # summed over workers, if any
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] += float(line.split()[-1])
    return counts


def connections_by_worker(pair: Pair) -> dict[str, float]:
    """Connections each inbound worker accepted so far (``--workers``), from its /metrics."""
    if pair.inbound_metrics is None:
        return {}
    with urlopen(f"http://{pair.inbound_metrics}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("tally_proxy_connections_total{") and 'worker="' in line:
            worker = line.split('worker="', 1)[1].split('"', 1)[0]
            counts[worker] = float(line.split()[-1])
    return counts


@dataclass(frozen=True)
class Bench:
    """What every run needs besides the contender and the workload."""

    bins: Binaries
    script: Path
    backend: Backend

    def run(self, pair: Pair, w: Workload, seconds: int) -> Run:
        return run_wrk(
            self.bins.wrk,
            self.script,
            pair.port,
            path=w.path,
            connections=w.connections,
            seconds=seconds,
            close=w.close,
            pids=pair.pids,
            backend_pid=self.backend.pid,
        )


def measure_throughput(
    bench: Bench, pairs: Sequence[Pair], plan: Plan
) -> tuple[dict[tuple[int, str], list[Run]], dict[str, dict[str, float]]]:
    """Every (workload, contender) ``plan.runs`` times, interleaved; the direct row runs once."""
    if plan.warmup_s:
        for w in WORKLOADS:
            for pair in pairs:
                if w.number in pair.workloads:
                    bench.run(pair, w, plan.warmup_s)
    runs: dict[tuple[int, str], list[Run]] = defaultdict(list)
    newconn: dict[str, dict[str, float]] = {}
    for round_no in range(plan.runs):
        for w in WORKLOADS:
            for pair in pairs:
                if (not pair.pids and round_no > 0) or w.number not in pair.workloads:
                    continue
                before = handshakes(pair) if w.close else {}
                runs[(w.number, pair.name)].append(bench.run(pair, w, plan.seconds))
                if w.close and pair.inbound_metrics is not None:
                    after = handshakes(pair)
                    seen = newconn.setdefault(pair.name, defaultdict(float))
                    for outcome, n in after.items():
                        seen[outcome] += n - before.get(outcome, 0.0)
    return runs, newconn


def measure_memory(start: Starter, count: int) -> Memory:
    """RSS of a fresh proxy pair before and after ``count`` idle keep-alive connections."""
    with contextlib.ExitStack() as stack:
        pair = start(stack)
        close_all(open_idle(pair.port, 8, "/small"))  # warm: first handshake, lazy imports
        time.sleep(SETTLE_S)
        before = tuple(rss_kib(pid) for pid in pair.pids)
        crowd = open_idle(pair.port, count, "/small")
        try:
            time.sleep(SETTLE_S)
            after = tuple(rss_kib(pid) for pid in pair.pids)
        finally:
            close_all(crowd)
    return Memory(pair.name, before, after, count)


def _fmt_ratio(value: float) -> str:
    return f"x{value:.2f}"


def print_table(runs: dict[tuple[int, str], list[Run]], names: Sequence[str]) -> None:
    header = (
        f"{'workload':<30} {'contender':<17} {'req/s':>7} {'spread':>6} {'MB/s':>7} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'err':>4} {'CPU us/req':>10} {'user':>5} "
        f"{'other':>5} {'vs stunnel':>10} {'vs haproxy':>10} {'vs hap http':>11}"
    )
    print(header)
    print("-" * len(header))
    for w in WORKLOADS:
        medians = {
            name: statistics.median(r.rps for r in runs[(w.number, name)])
            for name in names
            if runs.get((w.number, name))
        }
        labels = [f"{w.number}. {w.title}", f"   ({w.connections} connections)"]
        for name in names:
            got = runs.get((w.number, name))
            if not got:
                continue
            rps = [r.rps for r in got]
            med = medians[name]
            spread = f"±{(max(rps) - min(rps)) / 2 / med * 100:.0f}%" if len(rps) > 1 else "-"
            cpu = statistics.median(r.per_request_us(r.proxy_user_s + r.proxy_sys_s) for r in got)
            user = statistics.median(
                r.proxy_user_s / (r.proxy_user_s + r.proxy_sys_s or 1) for r in got
            )
            ratios = [
                _fmt_ratio(med / medians[ref])
                if name.startswith("tally") and ref in medians
                else "-"
                for ref in REFERENCES
            ]
            proxied = any(r.proxy_user_s + r.proxy_sys_s for r in got)
            print(
                f"{labels.pop(0) if labels else '':<30} {name:<17} {med:>7.0f} {spread:>6} "
                f"{statistics.median(r.mb_s for r in got):>7.1f} "
                f"{statistics.median(r.p50_ms for r in got):>7.2f} "
                f"{statistics.median(r.p99_ms for r in got):>7.2f} "
                f"{sum(r.errors for r in got):>4} "
                f"{(f'{cpu:.0f}' if proxied else '-'):>10} "
                f"{(f'{user:.0%}' if proxied else '-'):>5} "
                f"{statistics.median(r.other_cores for r in got):>5.2f} "
                f"{ratios[0]:>10} {ratios[1]:>10} {ratios[2]:>11}"
            )
        print()


def print_memory(results: Sequence[Memory]) -> None:
    print(
        f"{'memory per idle mTLS connection':<34} {'outbound KiB':>12} {'inbound KiB':>12} "
        f"{'both KiB':>9} {'MiB/1000':>9} {'RSS before MiB (out/in)':>24}"
    )
    for m in results:
        before = "/".join(f"{kib / 1024:.1f}" for kib in m.before_kib)
        print(
            f"{m.name:<34} {m.per_connection(0):>12.1f} {m.per_connection(1):>12.1f} "
            f"{m.total_per_connection:>9.1f} {m.total_per_connection * 1000 / 1024:>9.1f} "
            f"{before:>24}"
        )
    print("  (tally http not measured: an idle local connection holds no mTLS connection there)")
    by_name = {m.name: m.total_per_connection for m in results}
    for ref in REFERENCES:
        if ref in by_name and "tally tcp" in by_name and by_name[ref] > 0:
            print(
                f"  tally tcp memory per connection: x{by_name['tally tcp'] / by_name[ref]:.2f} {ref}"
            )


def print_header(bins: Binaries, plan: Plan, fd_limit: int) -> None:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(
        f"# tally proxy vs stunnel vs HAProxy: wrk -> outbound proxy -> inbound proxy -> nginx,"
        f" all on 127.0.0.1\n"
        f"# {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python"
        f" {platform.python_version()}, fd limit {fd_limit}\n"
        f"# the cores are SHARED by wrk (1 thread), nginx (1 worker) and both proxies; nothing"
        f" pinned, so absolute rates are lower than on a dedicated box\n"
        f"# threads: tally 1 per process, stunnel 1 per connection, HAProxy 1 per core"
        f" (defaults); per-connection logging off everywhere\n"
        f"# same SVIDs (EC P-256, minted by tally ca), TLS 1.3 only; tally also checks SPIFFE"
        f" IDs both ways, stunnel/HAProxy check the chain only\n"
        f"# same cipher suites for all ({CIPHERSUITES}); key exchange: tally's default is the"
        f" X25519MLKEM768 hybrid, stunnel/HAProxy (OpenSSL 3.0) X25519;\n"
        f"#   'tally tcp x25519' runs tally with --tls-groups X25519 (new connections only)\n"
        f"# {plan.runs} run(s) x {plan.seconds} s per cell, {plan.warmup_s} s warm-up per cell,"
        f" rounds interleaved; medians; spread = half the req/s range over runs\n"
        f"# MB/s = response bytes incl. headers / 1e6; p50/p99 = wrk per-request latency"
        f" (excludes wrk's own connect); err = wrk errors summed over runs\n"
        f"# CPU us/req = both proxies' user+sys CPU per request, user = its user-space share;"
        f" other = cores busy with anything but wrk, nginx and the proxies (other tenants)"
    )
    for line in versions(bins):
        print(f"#   {line}")
    print()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # unwind the stacks: stop every child
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 2 s run per cell (~1 min)")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--seconds", type=int, default=None, help="per run (wrk: whole seconds)")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for memory")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also run Tally with this many --workers per proxy (1: not at all)",
    )
    args = parser.parse_args()
    plan = Plan(
        runs=args.runs or (1 if args.quick else 3),
        seconds=args.seconds or (2 if args.quick else 5),
        warmup_s=0 if args.quick else 1,
        idle=args.idle,
    )
    fd_limit = raise_fd_limit()
    bins = ensure_packages()
    work = Path(tempfile.mkdtemp(prefix="tally-bench-proxy-"))
    began = time.monotonic()
    try:
        creds = mint_credentials(work)
        print_header(bins, plan, fd_limit)
        with contextlib.ExitStack() as backend_stack:
            backend = start_nginx(backend_stack, bins, work)
            bench = Bench(bins, write_script(work), backend)
            chosen = contenders(bins, creds, work, backend.port, args.workers)
            with contextlib.ExitStack() as stack:
                direct = Pair("direct (no proxy)", backend.port, ())
                pairs = [direct, *(c.start(stack) for c in chosen)]
                runs, newconn = measure_throughput(bench, pairs, plan)
                spreads = {pair.name: connections_by_worker(pair) for pair in pairs}
            print_table(runs, [p.name for p in pairs])
            for name, spread in spreads.items():
                if spread:
                    text = ", ".join(f"worker {k}: {int(n)}" for k, n in sorted(spread.items()))
                    print(f"  {name}: inbound connections per worker: {text}")
            for name, counts in newconn.items():
                text = ", ".join(f"{int(n)} {k}" for k, n in sorted(counts.items()) if n)
                print(f"  {name}: inbound handshakes during workload 3: {text or 'none'}")
            print()
            memory = [measure_memory(c.start, plan.idle) for c in chosen if c.memory]
            print_memory(memory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n# total {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
