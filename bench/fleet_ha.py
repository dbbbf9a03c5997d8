"""Two CA servers on one PostgreSQL carry a simulated fleet, with both up and with one gone.

The two-server row of ``bench/README.md``.  Starts a throwaway PostgreSQL 15
cluster (as the tests do, `tests.pg`), server A (which founds the cluster) and
server B (approved through A's admin socket), then N simulated agents of
`bench.fleet` (their own identities, the real agent's loops and client), each
given both servers: `agent.ca_client.CAServers` starts each on a random one and
moves it when its server fails.

Phases: everyone attests and holds fresh SVIDs; steady for ``--seconds`` with
both servers; A is SIGKILLed; every agent must then renew its own SVID and its
workloads' through B (the time that takes is reported); steady for
``--seconds`` on B alone; then A is started again (same address, already
approved) and B is SIGKILLed, and the same again on A alone, so that either
server is shown carrying the fleet without the other.  Errors are calls that
failed even after failover.  Prints one table row per phase (bench/README.md).

    .venv/bin/python -m bench.fleet_ha --agents 200 [--workloads 10] [--ttl 60]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from agent.ca_client import CAClient, make_csr
from bench.ca_daemon import TRUST_DOMAIN
from bench.fleet import TD, Admin, SimAgent, Stats, ca_pid_stats, joiner, pct, register_fleet
from tally.app.launch import Daemon
from tally.ops.config import Address
from tally.spiffe import pem, x509profile
from tests.pg import _start_cluster


def ca_daemon(work: Path, name: str, url: str, ttl: int, listen: str = "127.0.0.1:0") -> Daemon:
    return Daemon(
        "ca",
        [
            "ca", "run", "--trust-domain", TRUST_DOMAIN, "--data-dir", str(work / name),
            "--datastore", url, "--listen", listen,
            "--admin-socket", str(work / f"{name}.sock"), "--metrics", "127.0.0.1:0",
            "--agent-svid-ttl", str(ttl), "--default-svid-ttl", str(ttl), "--log-level", "info",
        ],
    )  # fmt: skip


async def steady(stats: Stats, seconds: float, pids: list[int]) -> dict[str, Any]:
    renew_from, errors0 = len(stats.renew_ms), sum(stats.errors.values())
    cpu0 = [ca_pid_stats(p)[0] for p in pids]
    t0 = time.perf_counter()
    await trio.sleep(seconds)
    elapsed = time.perf_counter() - t0
    cpu1 = [ca_pid_stats(p)[0] for p in pids]
    renew = stats.renew_ms[renew_from:]
    return {
        "ca_cpu": [round((b - a) / elapsed, 3) for a, b in zip(cpu0, cpu1, strict=True)],
        "renewals": len(renew),
        "renew_p50": pct(renew, 0.5),
        "renew_p99": pct(renew, 0.99),
        "errors": sum(stats.errors.values()) - errors0,
    }


async def run(args: argparse.Namespace, n: int, work: Path, url: str) -> dict[str, Any]:
    a = ca_daemon(work, "a", url, args.ttl)
    b = ca_daemon(work, "b", url, args.ttl)
    started_a = a.start("ca.started")
    try:
        waiting = b.start("ca.awaiting_approval")
        admin = Admin(str(work / "a.sock"))
        await admin.call("POST", "/v1/servers/approve", {"id": waiting["server"]})
        started_b = b.wait_for("ca.started")
        servers = [Address.parse(started_a["listen"]), Address.parse(started_b["listen"])]
        roots = pem.chain_from_pem(str((await admin.call("GET", "/v1/bundle"))["bundle"]).encode())
        csr = make_csr(x509profile.generate_key())
        stats = Stats()
        agents = []
        for i in range(n):
            agent = SimAgent(i, servers[0], roots, csr, stats)
            agent.client = CAClient(servers, TD, roots, timeout=60)  # both servers
            agents.append(agent)
        tokens, _ = await register_fleet(admin, n, args.workloads)
        join = joiner(args.ttl / 2, stats)

        async with trio.open_nursery() as nursery:
            for agent, token in zip(agents, tokens, strict=True):
                nursery.start_soon(join, agent, token)
            with trio.fail_after(600):
                for agent in agents:
                    await agent.fresh.wait()
            on_a = sum(1 for x in agents if x.client.servers.current == 0)
            both = await steady(stats, args.seconds, [a.pid, b.pid])

            async def without(dead: Daemon) -> dict[str, float]:
                """SIGKILL ``dead``; the seconds until every agent is fresh through the other,
                and the calls that failed meanwhile even after failover."""
                errors0 = sum(stats.errors.values())
                for agent in agents:
                    agent.fresh = trio.Event()
                dead.kill()
                killed_at = time.perf_counter()
                with trio.fail_after(600):
                    for agent in agents:
                        await agent.fresh.wait()
                return {
                    "all_fresh_s": round(time.perf_counter() - killed_at, 1),
                    "errors": sum(stats.errors.values()) - errors0,
                }

            through_b = await without(a)
            b_alone = await steady(stats, args.seconds, [b.pid])
            a = ca_daemon(work, "a", url, args.ttl, started_a["listen"])  # back, no approval
            await trio.to_thread.run_sync(lambda: a.start("ca.started"))
            through_a = await without(b)
            a_alone = await steady(stats, args.seconds, [a.pid])
            nursery.cancel_scope.cancel()
        for agent in agents:
            await agent.client.aclose()
        return {
            "servers": 2,
            "agents": n,
            "workloads": args.workloads,
            "agents_started_on_a": on_a,
            "both": both,
            "a_killed": through_b,
            "b_alone": b_alone,
            "b_killed": through_a,
            "a_alone": a_alone,
            "errors_by_code": dict(stats.errors),
        }
    finally:
        for d in (a, b):
            d.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--workloads", type=int, default=10)
    parser.add_argument("--ttl", type=int, default=60, help="agent and workload SVID TTL, s")
    parser.add_argument("--seconds", type=float, default=30, help="each steady window")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    clusters = _start_cluster()
    cluster = next(clusters)
    try:
        url = cluster.url(cluster.create_database())
        with tempfile.TemporaryDirectory(prefix="tally-fleet-ha-") as tmp:
            row = trio.run(run, args, args.agents, Path(tmp), url)
    finally:
        clusters.close()
    print(json.dumps(row, indent=2))
    print_table(row)


def print_table(row: dict[str, Any]) -> None:
    """The rows of bench/README.md's table: each phase, and what a server's loss cost."""
    print("| phase | CA CPU (share of one core) | renewals | renew p50 / p99 | errors |")
    print("|---|---|---|---|---|")
    both = row["both"]
    on_a = row["agents_started_on_a"]
    cpu = ", ".join(f"{n} {c:.0%}" for n, c in zip("AB", both["ca_cpu"], strict=True))
    print(
        f"| both servers up ({on_a} agents started on A, {row['agents'] - on_a} on B) | {cpu}"
        f" | {both['renewals']} | {both['renew_p50']:.0f} / {both['renew_p99']:.0f} ms"
        f" | {both['errors']} |"
    )
    for dead, alive in (("A", "B"), ("B", "A")):
        gone = row[f"{dead.lower()}_killed"]
        alone = row[f"{alive.lower()}_alone"]
        print(
            f"| {dead} SIGKILLed | — | — | every agent fresh again through {alive}"
            f" within {gone['all_fresh_s']:.0f} s | {gone['errors']} |"
        )
        print(
            f"| {alive} alone | {alive} {alone['ca_cpu'][0]:.0%} | {alone['renewals']}"
            f" | {alone['renew_p50']:.0f} / {alone['renew_p99']:.0f} ms | {alone['errors']} |"
        )


if __name__ == "__main__":
    main()
