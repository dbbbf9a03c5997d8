"""SVIDs signed per second through the real agent API.

Starts a real `tally ca run`, attests one agent, registers entries for it and
sends batches of CSRs over mutual TLS, as an agent does: TLS, HTTP, CSR
checks, signing, profile validation, the SQLite store and the audit chain are
all in the measured path.  The CA is one Python process, so this is one core.
Prints a table per batch size with the median of several runs.

    .venv/bin/python -m bench.ca [--runs 5] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
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


async def measure(ca_addr: str, admin: str, batch: int, seconds: float, runs: int) -> list[float]:
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
    for _ in range(runs):
        signed = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            results = await client.sign(requests)
            signed += sum(1 for r in results if "chain" in r)
        rates.append(signed / (time.perf_counter() - t0))
    await client.aclose()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batches", default="1,10,100,500")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    ca, admin = ca_daemon(work)
    started = ca.start("ca.started")
    print(f"{'batch':>6} {'median SVIDs/s':>15} {'min':>8} {'max':>8}  runs")
    try:
        for batch in (int(b) for b in args.batches.split(",")):
            rates = trio.run(measure, started["listen"], admin, batch, args.seconds, args.runs)
            print(
                f"{batch:>6} {statistics.median(rates):>15.0f} {min(rates):>8.0f} {max(rates):>8.0f}  {len(rates)}"
            )
    finally:
        ca.stop()


if __name__ == "__main__":
    main()
