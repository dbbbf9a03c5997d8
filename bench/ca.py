"""SVIDs signed per second through the real agent API.

Starts a real `tally ca run`, attests one agent, registers entries for it and
sends batches of CSRs over mutual TLS, as an agent does: TLS, HTTP, CSR
checks, signing, profile validation, the SQLite store and the audit chain are
all in the measured path.  CSR checks and signing run in the CA's signing
workers (``signing_workers``, one per CPU by default), the rest in its main
process.  Prints a table per batch size with the median of several runs, and
the CPU the CA spent per SVID: in its main process (the serial part, which
bounds the rate however many cores there are) and in its signing workers.

    .venv/bin/python -m bench.ca [--runs 5] [--seconds 4] [--signing-workers auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import trio

from agent.ca_client import CAClient, make_csr
from bench.ca_daemon import TRUST_DOMAIN, ca_daemon
from tally.app.launch import run_cli
from tally.ops.config import Address
from tally.spiffe import pem, x509profile
from tally.spiffe.spiffeid import TrustDomain


def cli(admin: str, *args: str):
    result = run_cli("ca", *args, "--admin-socket", admin, "--output", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (the signing workers are the forkserver's children)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found.extend(kids)
        frontier = kids
    return found


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds of the CA's main process and of all its descendants (the workers)."""
    others = 0.0
    for child in descendants(pid):
        try:
            others += _cpu(child)
        except OSError:
            pass
    return _cpu(pid), others


async def measure(
    ca_addr: str, admin: str, ca_pid: int, batch: int, seconds: float, runs: int
) -> tuple[list[float], float, float]:
    """SVIDs/s of each run, and the CA's main and worker CPU microseconds per SVID."""
    roots = pem.chain_from_pem(cli(admin, "bundle", "show")["bundle"].encode())
    token = cli(admin, "token", "create")["token"]
    client = CAClient(Address.parse(ca_addr), TrustDomain.parse(TRUST_DOMAIN), roots, timeout=60)
    key = x509profile.generate_key()
    issued, _, _ = await client.attest(token, key)
    client.set_identity(issued.chain, key)
    entry_ids = []
    for i in range(min(batch, 50)):
        e = cli(
            admin,
            "entry",
            "create",
            "--spiffe-id",
            f"spiffe://{TRUST_DOMAIN}/w{i}",
            "--parent-id",
            issued.spiffe_id,
            "--selector",
            f"unix:uid:{i}",
        )
        entry_ids.append(e["id"])
    csrs = [make_csr(x509profile.generate_key()) for _ in range(batch)]
    requests = [(entry_ids[i % len(entry_ids)], csrs[i]) for i in range(batch)]
    await client.sign(requests[:1])  # warm the connection
    rates = []
    total = 0
    main0, workers0 = cpu_split(ca_pid)
    for _ in range(runs):
        signed = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            results = await client.sign(requests)
            signed += sum(1 for r in results if "chain" in r)
        rates.append(signed / (time.perf_counter() - t0))
        total += signed
    main1, workers1 = cpu_split(ca_pid)
    await client.aclose()
    return rates, (main1 - main0) / total * 1e6, (workers1 - workers0) / total * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batches", default="1,10,100,500")
    parser.add_argument("--signing-workers", default="auto")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    ca, admin = ca_daemon(work, "--signing-workers", args.signing_workers)
    started = ca.start("ca.started")
    print(f"signing_workers {args.signing_workers}; load average {os.getloadavg()[0]:.1f}")
    print(
        f"{'batch':>6} {'median SVIDs/s':>15} {'min':>8} {'max':>8}  runs"
        f"  {'CA main µs/SVID':>15} {'workers µs/SVID':>15}"
    )
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            rates, main_us, workers_us = trio.run(
                measure, started["listen"], admin, ca.pid, batch, args.seconds, args.runs
            )
            print(
                f"{batch:>6} {statistics.median(rates):>15.0f} {min(rates):>8.0f}"
                f" {max(rates):>8.0f}  {len(rates):>4}  {main_us:>15.0f} {workers_us:>15.0f}"
            )
    finally:
        ca.stop()


if __name__ == "__main__":
    main()
